"""Processes: exit status, signals, ending layers, failed starts, start conditions."""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import (
    ENGINE,
    TIMEOUT,
    app_layer,
    layer,
    processes_with,
    py,
    read_line,
    run_sandbox,
    sandbox,
    sh,
    start_sandbox,
    wait_gone,
    wait_until,
    write_spec,
)


def sleeper(marker: str, seconds: int = 1000) -> dict:
    return {"argv": ["sleep", str(seconds)], "argv0": marker}


@pytest.mark.parametrize("script, status", [("exit 0", 0), ("exit 7", 7), ("exit 255", 255),
                                            ("kill -KILL $$", 137), ("kill -TERM $$", 143)])
def test_exit_status_of_the_main_command(tmp_path, script, status):
    assert run_sandbox(tmp_path, sandbox(app_layer(command=sh(script)))).returncode == status


def test_exit_status_travels_up_from_a_deep_main_command(tmp_path):
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sh("exit 42"))
    middle = layer("middle", namespaces=["mount"], layers=[leaf])
    assert run_sandbox(tmp_path, sandbox(app_layer("top", layers=[middle]))).returncode == 42


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                   signal.SIGUSR1, signal.SIGUSR2])
def test_signals_to_the_engine_reach_the_main_command(tmp_path, signo):
    """Through an adopted sub-layer too: `middle` steps aside, `top` forwards to `leaf`."""
    name = signal.Signals(signo).name[3:]
    script = f"trap 'echo got-{name}; exit 40' {name}; echo ready; while :; do sleep 0.05; done"
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sh(script))
    middle = layer("middle", namespaces=["mount"], layers=[leaf])
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[middle])),
                            preexec_fn=lambda: signal.signal(signo, signal.SIG_DFL))
    ready = read_line(running.proc.stdout)
    if ready != "ready\n":
        pytest.fail(f"no ready line: {running.finish().stderr!r}")
    running.proc.send_signal(signo)
    result = running.finish()
    assert (result.returncode, result.stdout) == (40, f"got-{name}\n")


def test_signals_the_caller_ignores_stay_ignored(tmp_path):
    """Like nohup: an ignored SIGHUP is neither forwarded nor reset for the command."""
    script = "trap 'echo got-HUP' HUP; echo ready; sleep 0.5; echo done"
    running = start_sandbox(tmp_path, sandbox(app_layer(command=sh(script))),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert read_line(running.proc.stdout) == "ready\n"
    running.proc.send_signal(signal.SIGHUP)
    result = running.finish()
    assert (result.returncode, result.stdout) == (0, "done\n")


def test_signals_from_inside_do_not_steer_the_supervisor(tmp_path):
    # pid 1 of the layer is its supervisor: the sandbox may signal it, nothing happens.
    script = "kill -TERM 1; kill -USR1 1; kill -KILL 1; sleep 0.2; echo alive"
    result = run_sandbox(tmp_path, sandbox(app_layer(command=sh(script))))
    assert (result.returncode, result.stdout) == (0, "alive\n")


@pytest.mark.parametrize("pid_namespace", [True, False])
def test_companions_end_with_the_main_command_and_never_hold_the_instance(
        tmp_path, marker, pid_namespace):
    namespaces = ["user", "mount"] + (["pid"] if pid_namespace else [])
    fs = None if pid_namespace else [op for op in app_layer()["fs"] if op["op"] != "proc"]
    keys = {"fs": fs} if fs else {}
    spec = sandbox(app_layer(namespaces=namespaces, command=sh("sleep 0.2"),
                             companions=[sleeper(marker)], **keys))
    started = time.monotonic()
    result = run_sandbox(tmp_path, spec, timeout=20)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 15
    assert wait_gone(processes_with(marker)) == []


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def test_layers_with_nothing_to_run_hand_their_sub_layers_up(tmp_path, marker):
    """`pass1` and `pass2` (no pid namespace, no command) step aside once the tree runs: no
    supervisor of theirs stays, their sub-layers are reparented to `top` (pid 1 of their pid
    namespace), which takes over supervising them; the layers still work. (`pass1` has a
    filesystem operation, so it gets a process that steps aside; `pass2`, an empty mount
    namespace, none at all: its parent's process builds it, LayerPlan.inline.)"""
    script = "echo ready; read line; exit 42"
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sh(script))
    side = layer("side", namespaces=["user", "mount", "pid"], companions=[sleeper(marker)])
    inner = layer("pass2", namespaces=["mount"], layers=[leaf, side])
    outer = layer("pass1", namespaces=["mount"], fs=[{"op": "tmpfs", "dest": "/tmp"}],
                  layers=[inner])
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[outer])),
                            stdin=subprocess.PIPE)
    assert read_line(running.proc.stdout) == "ready\n"
    top = running.layer("top")["pid"]
    # (-1: a process that has already left; 0: none)
    assert running.layer("pass1")["pid"] != 0 and running.layer("pass2")["pid"] == 0
    assert wait_gone([running.layer("pass1")["pid"]]) == []
    assert _parent(running.layer("leaf")["pid"]) == top
    assert _parent(running.layer("side")["pid"]) == top
    running.proc.stdin.write("go\n")
    running.proc.stdin.flush()
    result = running.finish()
    assert result.returncode == 42, result.stderr
    assert wait_gone([e["pid"] for e in running.info] + processes_with(marker)) == []


def test_a_subreaper_layer_adopts_the_sub_layers_of_a_layer_that_steps_aside(tmp_path):
    """The adopter is the nearest layer that stays: here `keeper` (no pid namespace of its
    own, a command to run), not `top`."""
    leaf = layer("leaf", namespaces=["user", "mount", "pid"],
                 command=sh("echo ready; read line; exit 5"))
    passing = layer("passing", namespaces=["mount"], fs=[{"op": "tmpfs", "dest": "/tmp"}],
                    layers=[leaf])  # (its operation gives it a process, which steps aside)
    keeper = layer("keeper", namespaces=["mount"], companions=[["sleep", "1000"]],
                   layers=[passing])
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[keeper])),
                            stdin=subprocess.PIPE)
    assert read_line(running.proc.stdout) == "ready\n"
    assert running.layer("passing")["pid"] != 0  # (-1 once it has left)
    assert wait_gone([running.layer("passing")["pid"]]) == []
    assert _parent(running.layer("leaf")["pid"]) == running.layer("keeper")["pid"]
    running.proc.stdin.write("go\n")
    running.proc.stdin.flush()
    assert running.finish().returncode == 5


def test_an_empty_mount_layer_with_nothing_to_run_is_built_by_its_parents_process(tmp_path,
                                                                                 marker):
    """`empty` (a mount namespace and nothing else) gets no process: `keeper`'s supervisor
    unshares it, reports it and clones `leaf` from there, then returns to its own mount
    namespace, where its command runs. The layer still has a mount namespace of its own;
    its other namespaces are keeper's."""
    script = "readlink /proc/self/ns/mnt; echo ready; read line; exit 3"
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], uid=0, gid=0,
                 companions=[sleeper(marker)])
    empty = layer("empty", namespaces=["mount"], layers=[leaf])
    keeper = layer("keeper", namespaces=["mount"], command=sh(script), layers=[empty])
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[keeper])),
                            stdin=subprocess.PIPE)
    try:
        own_view = read_line(running.proc.stdout).strip()
        assert read_line(running.proc.stdout) == "ready\n"
        keeper_, empty_, leaf_ = (running.layer(n) for n in ("keeper", "empty", "leaf"))
        assert empty_["pid"] == 0 and keeper_["pid"] > 0
        assert _parent(leaf_["pid"]) == keeper_["pid"]
        mnt = {n["layer"]: n["namespaces"]["mnt"] for n in (keeper_, empty_, leaf_)}
        assert len(set(mnt.values())) == 3
        assert own_view == f"mnt:[{mnt['keeper']}]"  # keeper's process went back to its own
        assert {k: v for k, v in empty_["namespaces"].items() if k != "mnt"} == \
            {k: v for k, v in keeper_["namespaces"].items() if k != "mnt"}
    finally:
        running.proc.stdin.write("go\n")
        running.proc.stdin.flush()
        result = running.finish()
    assert result.returncode == 3, result.stderr
    assert wait_gone([e["pid"] for e in running.info if e["pid"]] + processes_with(marker)) \
        == []


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_a_layer_with_its_own_pid_namespace_and_nothing_to_run_retires_into_an_init(tmp_path):
    """`idle` stays pid 1 of its pid namespace, but as `sleep infinity`: no_new_privs,
    SIGCHLD ignored (the kernel reaps its orphans), the supervised signals blocked, and the
    supervisor's capabilities (which keep the sandbox out of its /proc files). The engine's
    caller signals `leaf`, the main command's layer, directly."""
    script = "trap 'echo got-TERM; exit 40' TERM; echo ready; while :; do sleep 0.05; done"
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sh(script))
    idle = layer("idle", namespaces=["mount", "pid"], layers=[leaf])
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[idle])),
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    assert read_line(running.proc.stdout) == "ready\n"
    init = running.layer("idle")["pid"]
    deadline = time.monotonic() + 10
    while not open(f"/proc/{init}/cmdline", "rb").read().startswith(b"bbl-init idle\0"):
        assert time.monotonic() < deadline, "idle's supervisor never became an init"
        time.sleep(0.02)
    status = _status(init)
    full = f"{(1 << (int(open('/proc/sys/kernel/cap_last_cap').read()) + 1)) - 1:016x}"
    assert (status["CapEff"], status["CapPrm"], status["NoNewPrivs"]) == (full, full, "1")
    assert int(status["SigIgn"], 16) & (1 << (signal.SIGCHLD - 1))
    assert int(status["SigBlk"], 16) & (1 << (signal.SIGTERM - 1))
    assert _parent(running.layer("leaf")["pid"]) == init
    running.proc.send_signal(signal.SIGTERM)
    result = running.finish()
    assert (result.returncode, result.stdout) == (40, "got-TERM\n")
    assert wait_gone([entry["pid"] for entry in running.info]) == []


def test_a_layer_whose_pid_namespace_runs_commands_keeps_a_supervisor_out_of_reach(tmp_path):
    """`top` runs nothing, but `mid` (no pid namespace of its own) runs its command in
    top's pid namespace: top must not retire into a dumpable init. From the command, pid 1's
    /proc entries stay closed, its fd list included."""
    script = "ls /proc/1/fd >/dev/null 2>&1 && echo OPEN-fd; cat /proc/1/environ >/dev/null " \
             "2>&1 && echo OPEN-environ; readlink /proc/1/root >/dev/null && echo OPEN-root; " \
             "tr '\\0' ' ' </proc/1/cmdline; echo"
    mid = layer("mid", namespaces=["mount"], command=sh(script))
    result = run_sandbox(tmp_path, sandbox(app_layer("top", layers=[mid])))
    assert result.returncode == 0, result.stderr
    assert "OPEN" not in result.stdout and "bbl-init" not in result.stdout, result.stdout


def test_the_end_of_a_main_below_a_retired_layer_ends_the_instance(tmp_path):
    """Even when the main sub-layer's supervisor dies without a word (SIGKILL): the layer
    that follows it watches its pidfd."""
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sh("echo ready; sleep 1000"))
    idle = layer("idle", namespaces=["mount", "pid"], layers=[leaf])
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[idle])))
    assert read_line(running.proc.stdout) == "ready\n"
    os.kill(running.layer("leaf")["pid"], signal.SIGKILL)
    assert running.finish(timeout=20).returncode == 128 + signal.SIGKILL
    assert wait_gone([entry["pid"] for entry in running.info]) == []


def test_a_main_command_that_ends_at_once_still_ends_the_instance(tmp_path):
    """The main command may end before its adopter has read the hand-over that names its
    layer: the adopter keeps unknown pids' statuses until every hand-over has come."""
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sh("exit 9"))
    chain = layer("pass2", namespaces=["mount"], layers=[leaf])
    chain = layer("pass1", namespaces=["mount"], layers=[chain])
    chain = layer("retired", namespaces=["mount", "pid"], layers=[chain])
    chain = layer("pass0", namespaces=["mount"], layers=[chain])
    for _ in range(10):
        assert run_sandbox(tmp_path, sandbox(app_layer("top", layers=[chain])),
                           timeout=20).returncode == 9


def test_daemonized_orphans_of_a_layer_without_pid_namespace_are_killed(tmp_path, marker):
    script = f"setsid bash -c 'exec -a {marker} sleep 1000' </dev/null >/dev/null 2>&1 & exit 3"
    spec = sandbox(layer("flat", namespaces=["user", "mount"], command=sh(script)))
    result = run_sandbox(tmp_path, spec, timeout=20)
    assert result.returncode == 3
    assert wait_gone(processes_with(marker)) == []


LONE_LAYER_PROBE = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
flag = ctypes.c_int(-1)
libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
r, w = os.pipe()
gone_r, gone_w = os.pipe()  # (its write end closes when the orphans' parent has ended)
if os.fork() == 0:  # an orphan that reports its new parent, and one that ends at once
    if os.fork() == 0:
        os.close(r)
        os.close(gone_w)
        os.read(gone_r, 1)  # EOF: our parent has ended, we are an orphan now
        os.write(w, str(os.getppid()).encode())
        os._exit(0)
    if os.fork() == 0:
        os._exit(0)
    os._exit(0)
os.close(w)
os.close(gone_w)
adopter = int(os.read(r, 20))
def zombies_of_ours():
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] == "Z" and int(stat[1]) == os.getppid():
            found.append(entry)
    return found
deadline = time.monotonic() + 10  # (the adopter reaps them as they end: wait for that)
while (zombies := zombies_of_ours()) and time.monotonic() < deadline:
    time.sleep(0.01)
print(os.getppid(), flag.value, adopter == os.getppid(), zombies)
"""


def test_a_lone_layer_without_pid_namespace_runs_its_command_as_layer_1(tmp_path):
    """plan._replace_main_supervisor: no supervisor forks the command; the command is no
    subreaper (exec keeps that flag); its orphans go to the engine's caller, which reaps
    those that end while the instance runs."""
    spec = sandbox(layer("flat", namespaces=["user", "mount"], command=py(LONE_LAYER_PROBE)))
    running = start_sandbox(tmp_path, spec)
    result = running.finish(timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{running.proc.pid} 0 True []\n"


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGUSR1])
def test_a_main_layer_without_pid_namespace_below_one_with_runs_its_command_itself(tmp_path,
                                                                                  signo):
    """bubblewrap's --dev shape: `top` (pid namespace) builds, `user` only changes the uid
    and runs the command. The command is `user`'s process (pid 2, its parent `top`'s pid 1,
    as under bubblewrap); signals reach it through `top`; its status comes back."""
    name = signal.Signals(signo).name[3:]
    script = f"trap 'exit 40' {name}; echo $$ $PPID; while :; do sleep 0.05; done"
    inner = layer("user", namespaces=["user"], command=sh(script))
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[inner])),
                            preexec_fn=lambda: signal.signal(signo, signal.SIG_DFL))
    try:
        assert read_line(running.proc.stdout) == "2 1\n"
        assert running.layer("user")["pid"] != running.layer("top")["pid"]
        running.proc.send_signal(signo)
        assert running.finish().returncode == 40
    finally:
        if running.proc.poll() is None:  # its pid namespace ends with its pid 1
            os.kill(running.layer("top")["pid"], signal.SIGKILL)
            running.finish()


def test_killing_a_lone_layer_1_command_still_ends_its_orphans(tmp_path, marker):
    """Without a supervisor in layer 1, SIGKILL to its process (the command) leaves its
    daemonized orphans to the engine's caller, which ends them with the instance."""
    script = f"setsid bash -c 'exec -a {marker} sleep 1000' </dev/null >/dev/null 2>&1 & " \
             "echo ready; exec sleep 1000"
    spec = sandbox(layer("flat", namespaces=["user", "mount"], command=sh(script)))
    running = start_sandbox(tmp_path, spec)
    layer_1 = running.layer("flat")["pid"]  # the command itself
    try:
        assert read_line(running.proc.stdout) == "ready\n"
        deadline = time.monotonic() + 10
        while not (orphans := _named(marker)) and time.monotonic() < deadline:
            time.sleep(0.02)  # (setsid may fork: the marker is in its command line too)
        assert len(orphans) == 1
        os.kill(layer_1, signal.SIGKILL)
        assert running.finish().returncode == 128 + signal.SIGKILL
        assert wait_gone(orphans) == []
    finally:
        if running.proc.poll() is None:  # a failed assertion must not leave anything behind
            os.kill(layer_1, signal.SIGKILL)
            running.proc.kill()
            running.proc.communicate()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def _named(marker: str) -> list[int]:
    """The processes whose argv[0] is `marker`."""
    named = []
    for pid in processes_with(marker):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(marker.encode() + b"\0"):
                    named.append(pid)
        except OSError:
            pass
    return named


def test_killing_layer_1_kills_the_whole_tree(tmp_path, marker):
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sleeper(marker),
                 companions=[sleeper(marker)])
    side = layer("side", namespaces=["user", "mount", "pid"], companions=[sleeper(marker)])
    running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[leaf, side])))
    supervisors = [entry["pid"] for entry in running.info]
    assert len(supervisors) == 3
    deadline = time.monotonic() + 10
    while len(processes_with(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    commands = processes_with(marker)
    assert len(commands) == 3
    os.kill(running.layer("top")["pid"], signal.SIGKILL)
    assert running.finish().returncode == 128 + signal.SIGKILL
    assert wait_gone(supervisors + commands) == []


@pytest.mark.parametrize("tree", ["one layer", "retired layer 1"])
def test_die_with_parent_takes_the_tree_down_when_the_caller_dies(tmp_path, marker, tree):
    """Also when layer 1 retired into a minimal init (its parent-death signal survives the
    exec) and the layer in between stepped aside."""
    if tree == "one layer":
        spec = sandbox(app_layer(command=sleeper(marker)))
    else:
        leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=sleeper(marker))
        spec = sandbox(app_layer(layers=[layer("between", namespaces=["mount"],
                                               layers=[leaf])]))
    running = start_sandbox(tmp_path, spec)
    pids = [entry["pid"] for entry in running.info] + processes_with(marker)
    if tree != "one layer":
        deadline = time.monotonic() + 10
        while not open(f"/proc/{pids[0]}/cmdline", "rb").read().startswith(b"bbl-init"):
            assert time.monotonic() < deadline, "layer 1 never retired"
            time.sleep(0.02)
    running.proc.kill()  # the engine's caller, SIGKILL: no chance to clean up
    running.finish()
    assert wait_gone(pids) == []


def failing_tree(tmp_path, marker, failing_op) -> dict:
    witness = tmp_path / "ran"
    leaf = layer("leaf", namespaces=["user", "mount", "pid"],
                 command=sh(f"touch {witness}"), companions=[sleeper(marker)])
    broken = layer("broken", namespaces=["mount"], new_root=True, fs=[failing_op])
    middle = layer("middle", namespaces=["mount", "pid"], layers=[leaf, broken],
                   companions=[sleeper(marker)])
    top = app_layer("top", layers=[middle], fs=app_layer()["fs"] + [
        {"op": "bind", "src": str(tmp_path), "dest": str(tmp_path)}])
    return sandbox(top)


@pytest.mark.parametrize("failing_op, message, status", [
    ({"op": "ro-bind", "src": "/nonexistent-source", "dest": "/x"},
     "bbl: layer 'broken': fs[0] (ro-bind) /x: source /nonexistent-source does not exist in "
     "the parent layer's view\n", 2),
    ({"op": "chmod", "path": "/nope", "mode": "0755"},
     "bbl: layer 'broken': fs[0] (chmod) /nope: No such file or directory\n", 1),
])
def test_a_failed_start_runs_nothing_and_leaves_nothing(tmp_path, marker, failing_op,
                                                        message, status):
    before = set(os.listdir(tmp_path))
    with open("/proc/self/mountinfo") as f:
        mounts_before = f.read()
    result = run_sandbox(tmp_path, failing_tree(tmp_path, marker, failing_op))
    assert result.returncode == status
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "ran").exists()  # no command ran before the tree was complete
    assert set(os.listdir(tmp_path)) == before | {"spec.json"}
    assert processes_with(marker) == []
    with open("/proc/self/mountinfo") as f:
        assert f.read() == mounts_before


def test_exec_failure_fails_the_start_naming_the_layer(tmp_path, marker):
    leaf = layer("leaf", namespaces=["user", "mount", "pid"],
                 command=["/no/such/program", "arg"], companions=[sleeper(marker)])
    result = run_sandbox(tmp_path, sandbox(app_layer("top", layers=[leaf])))
    assert result.returncode == 2
    assert result.stderr == ("bbl: layer 'leaf': command '/no/such/program': cannot execute: "
                             "No such file or directory\n")
    assert wait_gone(processes_with(marker)) == []


def test_start_after_waits_for_a_listening_socket(tmp_path):
    path = tmp_path / "ready.sock"
    server = socket.socket(socket.AF_UNIX)

    def listen_later():
        time.sleep(0.5)
        server.bind(str(path))
        server.listen()

    thread = threading.Thread(target=listen_later)
    thread.start()
    gated = layer("gated", namespaces=["mount"], start_after=[str(path)],
                  command=sh("echo started"))
    try:
        result = run_sandbox(tmp_path, sandbox(app_layer("top", layers=[gated], fs=app_layer()[
            "fs"] + [{"op": "bind", "src": str(tmp_path), "dest": str(tmp_path)}])))
    finally:
        thread.join()
        server.close()
    assert (result.returncode, result.stdout) == (0, "started\n"), result.stderr


def test_an_early_companion_starts_before_the_go_and_the_rest_after(tmp_path):
    """`early` companions run while the instance's go is still held (here by block_fd);
    the command and the other companions only after it."""
    binds = app_layer()["fs"] + [{"op": "bind", "src": str(tmp_path), "dest": "/out"}]
    early, late = tmp_path / "early", tmp_path / "late"
    top = app_layer("top", fs=binds, command=sh("cat /out/early; sleep 600"), companions=[
        {"argv": sh("echo early > /out/early; exec sleep 600"), "early": True},
        sh("echo late > /out/late; exec sleep 600")])
    block_r, block_w = os.pipe()
    path = write_spec(tmp_path, sandbox(top, block_fd=block_r))
    proc = subprocess.Popen([*ENGINE, str(path)], pass_fds=(block_r,), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(block_r)
    try:
        assert wait_until(early.exists)  # while the go is held
        assert not late.exists()
        os.write(block_w, b"x")
        assert read_line(proc.stdout) == "early\n"
        assert wait_until(late.exists)
    finally:
        os.close(block_w)
        proc.kill()
        proc.communicate(timeout=TIMEOUT)


def test_only_companions_start_early():
    from bbld import spec

    layer = spec.Layer(name="l", command=spec.Command(argv=["x"], early=True))
    with pytest.raises(spec.SpecError) as err:
        spec.check(spec.Sandbox(layer=layer))
    assert "layer 'l': command.early: only companions start early" in str(err.value)


def test_start_after_gives_up_after_its_timeout(tmp_path):
    gated = layer("gated", namespaces=["mount"], start_after=[str(tmp_path / "never.sock")],
                  start_timeout=0.3, command=["true"])
    result = run_sandbox(tmp_path, sandbox(app_layer("top", layers=[gated])))
    assert result.returncode == 1
    assert result.stderr.startswith(f"bbl: layer 'gated': start_after: {tmp_path}/never.sock "
                                    "did not accept connections in time")


def test_a_companion_with_output_null_says_nothing_on_the_instances_stdio(tmp_path):
    """(the template's display helpers: their chatter would land in the app's terminal)"""
    spec = sandbox(app_layer(command=sh("sleep 0.5; echo main"), companions=[
        {"argv": ["sh", "-c", "echo loud; echo louder >&2"], "output": "null"},
        {"argv": ["sh", "-c", "echo heard"]}]))
    result = run_sandbox(tmp_path, spec)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["heard", "main"] and "louder" not in result.stderr
