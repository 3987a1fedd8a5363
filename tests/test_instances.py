"""Instance management through bbld and bblctl: ps, tree, exec, attach, stop, kill."""

import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import (
    Session,
    app_layer,
    layer,
    processes_with,
    read_line,
    sandbox,
    sh,
    system_ops,
    wait_gone,
    wait_until,
)

# What a process sees of its own restrictions; compared between a layer's command and exec.
REPORT = ("grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp|Uid|Gid):' /proc/self/status; "
          "cat /proc/self/uid_map /proc/self/gid_map; "
          "for ns in user mnt pid net ipc uts cgroup; do readlink /proc/self/ns/$ns; done; "
          "env | grep -v '^PWD=' | sort; pwd; umask")


def nested_spec(out: str, marker: str) -> dict:
    """Two layers: the outer builds the view; the app runs with dropped ids, a capability,
    a seccomp policy and its own environment, writes REPORT to OUT/main, then waits."""
    app = layer("app", namespaces=["user", "mount", "pid", "net", "uts"], uid=1000, gid=1000,
                hostname="inner", caps=["net_bind_service"], seccomp={"policy": "default"},
                env={"set": {"LAYER": "app"}, "unset": ["HOME"]}, cwd="/tmp",
                command=[*sh(f"({REPORT}) > /out/main; exec sleep 600"), marker])
    outer = app_layer("outer", fs=[*system_ops(), {"op": "bind", "src": out, "dest": "/out"}],
                      env={"set": {"OUTER": "1"}}, layers=[app])
    return sandbox(outer)


def wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) or not open(path).read():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return open(path).read()


@pytest.fixture
def app(instances, tmp_path, marker):
    out = tmp_path / "out"
    out.mkdir()
    instance = instances.start(nested_spec(str(out), marker))
    wait_for(out / "main")
    return instance, out


def test_exec_gets_exactly_the_layers_restrictions(instances, app):
    instance, out = app
    result = instances.ctl("exec", instance, "--", "sh", "-c", REPORT)
    assert result.returncode == 0, result.stderr
    main = (out / "main").read_text()
    assert result.stdout == main
    assert "Seccomp:\t2" in main and "NoNewPrivs:\t1" in main and "LAYER=app" in main
    assert "OUTER=1" in main and "\nHOME=" not in main and main.endswith("/tmp\n0022\n")
    outer = instances.ctl("exec", "--layer", "outer", instance, "--", "sh", "-c", REPORT)
    assert outer.returncode == 0 and outer.stdout != main and "LAYER=app" not in outer.stdout


def test_a_mount_made_in_a_layer_without_a_process_stays_there(instances, marker):
    """`empty` (a mount namespace and nothing to run) is built by its parent's process
    (LayerPlan.inline). From inside it, with the capability to mount, a tmpfs is mounted:
    the layer above does not see it (its parent's process made the namespace and went back
    to its own)."""
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], uid=0, gid=0,
                 command=[*sh("exec sleep 600"), marker])
    empty = layer("empty", namespaces=["mount"], caps=["sys_admin"], layers=[leaf])
    instance = instances.start(sandbox(app_layer("top", layers=[empty])))
    tree = json.loads(instances.ctl("tree", instance, "--json").stdout)
    assert [node["pid"] for node in tree[0]["layers"][0]["children"]] == [None]  # no process
    probe = "grep -c bbl-leak-probe /proc/self/mountinfo"
    made = instances.ctl("exec", "--layer", "empty", instance, "--", "sh", "-c",
                         f"mount -t tmpfs bbl-leak-probe /tmp && {probe}")
    assert (made.returncode, made.stdout) == (0, "1\n"), made.stderr
    above = instances.ctl("exec", "--layer", "top", instance, "--", "sh", "-c", probe)
    assert above.stdout == "0\n", above.stderr


def test_exec_status_stdio_and_errors(instances, app):
    instance, _ = app
    result = instances.ctl("exec", instance, "--", "sh", "-c", "read x; echo got $x; exit 5",
                           input="line\n")
    assert (result.returncode, result.stdout) == (5, "got line\n")
    for argv, message in [
        (["exec", instance, "--", "/no/such/program"],
         "bblctl: '/no/such/program': cannot execute: No such file or directory\n"),
        (["exec", "--layer", "nope", instance, "--", "true"],
         "bblctl: no layer named 'nope' runs in this instance; layers that can be entered: "
         "outer, app\n"),
        (["exec", "feedbeef", "--", "true"],
         "bblctl: no running instance 'feedbeef'; see bblctl ps\n"),
        (["exec", instance], "bblctl exec: exec needs a command after the instance: "
                             "bblctl exec ID -- CMD...\n"),
        (["exec", "--bogus", instance, "true"],
         "bblctl exec: unknown option --bogus; see bblctl exec --help\n"),
    ]:
        bad = instances.ctl(*argv)
        assert (bad.returncode, bad.stderr) == (2, message), argv


def test_a_layer_with_nothing_left_to_run_cannot_be_entered_and_says_so(instances):
    """The default template's layer2a (no helpers) ends once the tree runs, and its pid
    namespace with it: exec and attach say so, and which layers can be entered."""
    instance = instances.ctl("start", "default", "--detach").stdout.strip()
    instances.ids.append(instance)
    for command in ("exec", "attach"):
        bad = instances.ctl(command, "--layer", "layer2a", instance, "--", "true")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad
        assert bad.stderr == ("bblctl: layer 'layer2a' has ended: nothing ran there, and its "
                              "pid namespace went with its supervisor; layers that can be "
                              "entered: layer1, layer2, layer2h, layer3, layer4\n"), bad


def test_exec_forwards_signals_and_dies_with_its_client(instances, app, marker):
    import subprocess
    import sys

    instance, _ = app
    proc = subprocess.Popen([sys.executable, "-m", "bblctl", "exec", instance, "--", "sh", "-c",
                             f"trap 'echo term; exit 7' TERM; echo ready; "
                             f"while :; do sleep 0.05; done; : {marker}-exec"],
                            env=instances.env, stdout=subprocess.PIPE, text=True)
    assert read_line(proc.stdout) == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7 and proc.stdout.read() == "term\n"
    proc = subprocess.Popen([sys.executable, "-m", "bblctl", "exec", instance, "--", "sh", "-c",
                             f"echo ready; sleep 600; : {marker}-orphan"],
                            env=instances.env, stdout=subprocess.PIPE, text=True)
    assert read_line(proc.stdout) == "ready\n"
    started = processes_with(f"{marker}-orphan")
    proc.kill()
    proc.wait(timeout=10)
    assert wait_gone(started) == []


def test_exec_into_a_retired_layer_and_its_orphans_are_reaped(instances, marker):
    """`idle` (own pid namespace, nothing to run) retired into a minimal init: exec still
    enters it, and what exec leaves behind there is reaped at once (SIGCHLD ignored)."""
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=["sleep", "600"])
    idle = layer("idle", namespaces=["mount", "pid"], layers=[leaf])
    instance = instances.start(sandbox(app_layer("top", layers=[idle])))
    (tree,) = json.loads(instances.ctl("tree", instance, "--json").stdout)
    init = tree["layers"][0]["children"][0]["pid"]
    script = f"for i in 1 2 3; do (sleep 0.1; : {marker}) & done; echo $$"
    result = instances.ctl("exec", "--layer", "idle", instance, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert wait_gone(processes_with(marker)) == []
    deadline = time.monotonic() + 10
    while True:  # a zombie would stay: only leaf's supervisor is left
        with open(f"/proc/{init}/task/{init}/children") as f:
            children = f.read().split()
        if len(children) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert children == [str(tree["layers"][0]["children"][0]["children"][0]["pid"])]
    assert f"\n    idle  pid {init} (a minimal init)  uid 0" in \
        instances.ctl("tree", instance).stdout
    # dumpable after its exec, yet its capabilities keep a process of its layer out
    for probe in ("readlink -v /proc/1/root", "cat /proc/1/environ", "readlink -v /proc/1/fd/0",
                  "head -c1 /proc/1/mem"):
        denied = instances.ctl("exec", "--layer", "idle", instance, "--", "sh", "-c", probe)
        assert denied.returncode != 0 and "denied" in denied.stderr, (probe, denied)


def test_ps_tree_kill_and_ps_all(instances, app):
    instance, _ = app
    listed = json.loads(instances.ctl("ps", "--json").stdout)
    (entry,) = listed
    assert entry["id"] == instance and entry["state"] == "running"
    assert entry["name"] == "sandbox" and entry["layers"] == 2 and entry["command"][0] == "sh"
    with open(f"/proc/{entry['pid']}/status") as f:
        assert "NoNewPrivs:\t1" in f.read()  # the main command's own host pid
    table = instances.ctl("ps").stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "STATE", "STARTED", "PID", "LAYERS", "MEM", "COMMAND"]
    assert table[1].startswith(instance)
    (tree,) = json.loads(instances.ctl("tree", instance, "--json").stdout)
    (outer,) = tree["layers"]
    (inner,) = outer["children"]
    assert (outer["name"], outer["uid"], inner["name"], inner["uid"]) == ("outer", 0, "app", 1000)
    assert outer["namespaces"]["user"] != inner["namespaces"]["user"]
    assert [p["command"] for p in inner["processes"]] == [["sleep", "600"]]
    assert outer["processes"] == []
    drawn = instances.ctl("tree").stdout
    assert "\n  outer  pid " in drawn and "\n    app  pid " in drawn and "· " in drawn
    killed = instances.ctl("kill", instance, "--signal", "TERM")
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 30
    while json.loads(instances.ctl("ps", "--json").stdout):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (ended,) = json.loads(instances.ctl("ps", "--all", "--json").stdout)
    assert (ended["id"], ended["state"], ended["status"], ended["pid"]) == (
        instance, "exited", 128 + signal.SIGTERM, None)


def test_stop_escalates_to_sigkill_after_the_timeout(instances, marker):
    instance = instances.start(sandbox(app_layer(
        command=[*sh("trap '' TERM; echo ready; sleep 600"), marker])))
    before = processes_with(marker)
    started = time.monotonic()
    result = instances.ctl("stop", instance, "--timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert 0.5 <= time.monotonic() - started < 20
    assert wait_gone(before) == []
    (ended,) = json.loads(instances.ctl("ps", "--all", "--json").stdout)
    assert ended["status"] == 128 + signal.SIGKILL


def test_stops_with_no_timeout_racing_the_instances_own_end(instances, tmp_path):
    """SIGTERM ends the command at once, so the SIGKILL that follows (timeout 0) often meets
    an instance that is ending: every stop still succeeds."""
    import subprocess

    from tests.conftest import BBLCTL

    path = tmp_path / "idle.toml"
    path.write_text('command = ["sleep", "600"]\nnet = "host"\n')
    ids = [instances.ctl("start", str(path), "--detach").stdout.strip() for _ in range(8)]
    instances.ids += ids
    for _ in range(3):
        stops = [subprocess.Popen([*BBLCTL, "stop", instance, "--timeout", "0"],
                                  env=instances.env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for instance in ids]
        outcomes = [(stop.wait(timeout=60), stop.stderr.read().splitlines()[-1:])
                    for stop in stops]
        for stop in stops:
            stop.stderr.close()
        # (each says what it did: "terminated", or "killed after 0 s" when SIGTERM was slow)
        assert [(code, re.sub(r"^bblctl: \w+: (terminated|killed after 0 s) \(status "
                                r"\d+\)$", "said", said[0]) if said else "")
                for code, said in outcomes] == [(0, "said")] * len(ids), outcomes
        ids = [instances.ctl("start", str(path), "--detach").stdout.strip() for _ in range(8)]
        instances.ids += ids


def test_no_bad_reference_or_option_gets_more_than_one_line(instances):
    """Every instance command, fed ids that name nothing (odd ones too), an ended instance,
    bad layers and bad option values: one line on stderr saying what and how to fix it,
    exit 2 (1 for what the machine refused), never a raw exception; and what runs, runs on."""
    started = instances.ctl("start", "default", "--detach", "--", "sleep", "600")
    ended = instances.ctl("start", "default", "--detach", "--", "true")
    live, gone = started.stdout.strip(), ended.stdout.strip()
    instances.ids.append(live)
    assert wait_until(lambda: gone not in instances.ctl("ps").stdout)
    ids = ["nope", "", "-", "../x", "x" * 5000, "ü", "a\nb", "%s", gone, gone[:6], "zz"]
    commands = [["tree", "ID"], ["exec", "ID", "--", "true"], ["attach", "ID"],
                ["attach", "--new", "ID"], ["attach", "ID", "--", "true"],
                ["send-args", "ID", "--", "x"], ["stop", "ID"], ["kill", "ID"],
                ["kill", "--signal", "0", "ID"]]
    cases = [[instance if word == "ID" else word for word in command]
             for command in commands for instance in ids]
    cases += [[*command, live] for command in (
        ["exec", "--layer", "nope"], ["exec", "--layer", ""], ["exec", "--layer=layer2a"],
        ["attach", "--layer", "nope"], ["attach", "--layer", "layer2a"], ["exec"],
        ["attach", "--detach-key", "x"], ["attach", "--detach-key", ""], ["kill", "--signal", "99"],
        ["kill", "--signal", "-1"], ["stop", "--timeout", "1e999"], ["stop", "--timeout", "nan"],
        ["tree", "extra"], ["send-args"], ["exec", "--bogus"])]
    cases += [["exec", live, "--", "/nonexistent"], ["attach", "--new", live, "--", "/nonexistent"],
              ["exec"], ["attach"], ["send-args"], ["kill", live, "--signal"]]
    said = {}
    for argv in cases:
        result = instances.ctl(*argv, stdin=subprocess.DEVNULL)
        lines = result.stderr.splitlines()
        if result.returncode not in (1, 2) or len(lines) != 1 or "Traceback" in result.stderr \
                or not lines[0].startswith("bblctl") or "Error(" in lines[0]:
            said[" ".join(argv)[:60]] = (result.returncode, result.stderr[-300:])
    assert said == {}
    assert [entry["id"] for entry in json.loads(instances.ctl("ps", "--json").stdout)] == [live]


@pytest.mark.parametrize("argv, message", [
    (["ps", "extra"], "bblctl ps: ps takes no arguments (got 'extra')\n"),
    (["stop"], "bblctl stop: stop takes one instance id or name; see bblctl ps\n"),
    (["stop", "x", "--timeout", "soon"],
     "bblctl stop: --timeout 'soon': give seconds from 0 to 86400, e.g. 5\n"),
    (["kill", "x", "--signal", "NOPE"],
     "bblctl kill: unknown signal 'NOPE'; use a name like TERM or a number\n"),
    (["tree", "nope"], "bblctl: no running instance 'nope'; see bblctl ps\n"),
    (["frobnicate"], "bblctl: unknown command 'frobnicate'; see bblctl --help\n"),
])
def test_bad_command_lines(instances, argv, message):
    result = instances.ctl(*argv)
    assert (result.returncode, result.stderr) == (2, message)


# ---------------------------------------------------------------- attach, through a real pty


def test_attach_gives_a_terminal_made_inside_the_sandbox(instances, app):

    instance, _ = app
    session = Session(["attach", instance, "--", "sh", "-i"], instances.env)
    try:
        session.expect("$ ")
        session.send("tty; stty size; echo $LAYER\r")
        out = session.expect("app")
        assert "/dev/pts/0" in out and "24 80" in out  # the sandbox's own devpts, our size
        session.expect("$ ")
        session.resize(50, 132)
        deadline = time.monotonic() + 10  # (the client's SIGWINCH handler copies the size)
        while True:
            session.send("stty size\r")
            if "50 132" in session.expect("$ "):
                break
            assert time.monotonic() < deadline, "the new size never reached the pty"
        session.send("sleep 6143\r")
        assert wait_until(lambda: processes_with("sleep\x006143"))  # the foreground job runs
        session.interrupt_and_exit(6)  # Ctrl-C reaches the sandbox's foreground job
    finally:
        session.close()
    (entry,) = json.loads(instances.ctl("ps", "--json").stdout)
    assert entry["state"] == "running"  # the instance itself goes on


def test_attach_gets_exactly_the_layers_restrictions(instances, app):
    instance, out = app
    result = instances.ctl("attach", instance, "--", "sh", "-c", f"({REPORT}) > /out/attached")
    assert result.returncode == 0, result.stderr
    assert (out / "attached").read_text() == (out / "main").read_text()


def test_attach_without_a_devpts_is_a_clear_error(instances):
    no_dev = sandbox(app_layer(fs=[op for op in system_ops() if op["op"] != "dev"],
                               command=["sleep", "600"]))
    instance = instances.start(no_dev)
    result = instances.ctl("attach", instance, "--", "sh")
    assert result.returncode == 2
    assert result.stderr.startswith("bblctl: the layer has no usable /dev/ptmx")


# ---------------------------------------------------------------- bbld may die


def test_instances_outlive_the_daemon_and_are_adopted_again(instances, marker):
    from tests.conftest import daemon_pid

    long = sandbox(app_layer(command=[*sh("sleep 600"), marker]))
    ids = [instances.start(long) for _ in range(20)]
    short = instances.start(sandbox(app_layer(command=sh("sleep 1.5"))))
    pid = daemon_pid(instances.env)
    os.kill(pid, signal.SIGKILL)
    assert wait_gone([pid]) == []
    directory = os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl", "instances")
    assert wait_until(lambda: os.path.exists(os.path.join(directory, f"{short}.exited")))
    # (the short one has ended while no daemon ran)
    listed = json.loads(instances.ctl("ps", "--json").stdout)  # starts a new bbld
    assert daemon_pid(instances.env) != pid
    assert sorted(entry["id"] for entry in listed) == sorted(ids)
    assert {entry["state"] for entry in listed} == {"running"}
    ended = [e for e in json.loads(instances.ctl("ps", "--all", "--json").stdout)
             if e["state"] == "exited"]
    assert [(e["id"], e["status"]) for e in ended] == [(short, 0)]
    for instance in ids:
        result = instances.ctl("exec", instance, "--", "sh", "-c", "echo $$")
        assert result.returncode == 0 and result.stdout.strip().isdigit(), result.stderr
    attached = instances.ctl("attach", ids[-1], "--", "sh", "-c", "tty; exit 4")
    assert (attached.returncode, attached.stdout) == (4, "/dev/pts/0\n"), attached.stderr
    assert instances.ctl("stop", ids[0]).returncode == 0
    assert len(json.loads(instances.ctl("ps", "--json").stdout)) == 19
    directory = os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl", "instances")
    assert sorted(os.listdir(directory)) == sorted(f"{i}.sock" for i in ids[1:])


def test_a_hundred_starts_and_stops_leave_nothing_behind(bbl_env, monkeypatch, marker):
    from bblctl.client import connect
    from tests.test_daemon_run import _children, _only_a_spare_left, _open_fds

    for name in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, bbl_env[name])
    spec = json.dumps(sandbox(app_layer(command=[*sh("echo up; exec sleep 600"), marker])))
    null = os.open(os.devnull, os.O_RDWR)
    cwd = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        with connect() as conn:
            pid = conn.call("io.bbl.Manager.Ping")["pid"]

        def cycle():
            with connect() as conn:
                replies = conn.stream("io.bbl.Manager.Run", fds=(null, null, null, cwd),
                                      spec=spec, args=[], env={"PATH": "/usr/bin:/bin"})
                instance = next(replies)["id"]
                with connect() as other:
                    assert other.call("io.bbl.Manager.Stop", id=instance,
                                      timeout=5)["status"] == 128 + signal.SIGTERM
                assert next(replies)["event"] == "exited"

        cycle()  # the helper now runs
        fds, children = _open_fds(pid), _children(pid)
        for _ in range(100):
            cycle()
    finally:
        os.close(null)
        os.close(cwd)
    assert wait_gone(processes_with(marker)) == []
    (helper,) = children
    _only_a_spare_left(helper)
    assert _open_fds(pid) == fds and _children(pid) == children
    directory = os.path.join(bbl_env["XDG_RUNTIME_DIR"], "bbl", "instances")
    assert os.listdir(directory) == []


# ---------------------------------------------------------------- send-args, single instance

APP = """#!/bin/sh
echo "got $*" >> "$(dirname "$0")/log"
mkdir "$(dirname "$0")/running" 2>&- && exec sleep 600
exit 0
"""


def app_script(tmp_path) -> str:
    script = tmp_path / "app.sh"
    script.write_text(APP)
    script.chmod(0o755)
    return str(script)


def lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_send_args_reruns_the_main_program_once(instances, tmp_path):
    script = app_script(tmp_path)
    outer = app_layer(fs=[*system_ops(), {"op": "bind", "src": str(tmp_path),
                                          "dest": str(tmp_path)}], command=[script, "first"])
    instance = instances.start(sandbox(outer, name="editor"))
    deadline = time.monotonic() + 30
    while lines(tmp_path / "log") != ["got first"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    result = instances.ctl("send-args", "editor", "--", "second", "two words")
    assert result.returncode == 0, result.stderr
    assert lines(tmp_path / "log") == ["got first", "got second two words"]
    assert json.loads(instances.ctl("ps", "--json").stdout)[0]["id"] == instance


def test_send_args_through_the_specs_template(instances, tmp_path):
    outer = app_layer(fs=[*system_ops(), {"op": "bind", "src": str(tmp_path), "dest": "/out"}],
                      command=["sleep", "600"])
    template = ["sh", "-c", 'printf "%s|" "$@" >> /out/log', "sh", "--remote", "{args}"]
    instance = instances.start(sandbox(outer, send_args=template))
    assert instances.ctl("send-args", instance, "a b", "c").returncode == 0
    assert (tmp_path / "log").read_text() == "--remote|a b|c|"


def test_racing_single_instance_starts_end_with_one_instance(instances, tmp_path):
    import subprocess
    import sys

    script = app_script(tmp_path)
    argv = [sys.executable, "-m", "bblctl", "run", "--name", "one", "--single-instance",
            "--ro-bind", "/", "/", "--bind", str(tmp_path), str(tmp_path), "--", script, "hi"]
    instances.ctl("ps")  # the daemon runs: both clients race for the instance, not for it
    racers = [subprocess.Popen(argv, env=instances.env, stdin=subprocess.DEVNULL)
              for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while len(lines(tmp_path / "log")) < 2:
            assert time.monotonic() < deadline, lines(tmp_path / "log")
            time.sleep(0.02)
        listed = json.loads(instances.ctl("ps", "--json").stdout)
        assert [entry["name"] for entry in listed] == ["one"]
        assert lines(tmp_path / "log") == ["got hi", "got hi"]
        instances.ids.append(listed[0]["id"])  # stopped at the end
        deadline = time.monotonic() + 30
        while all(racer.poll() is None for racer in racers):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        statuses = [racer.poll() for racer in racers]  # one forwarded and returned 0; the
        assert sorted(statuses, key=str) == [0, None]  # other is the instance's own client
    finally:
        for racer in racers:
            racer.kill()
            racer.wait(timeout=10)


def test_single_instance_needs_a_name(instances):
    result = instances.ctl("run", "--single-instance", "--ro-bind", "/", "/", "true")
    assert (result.returncode, result.stderr) == (
        2, "bblctl run: --single-instance needs --name NAME (what a second start looks for)\n")


def test_ps_watch_follows_starts_and_ends(instances):
    import subprocess
    import sys

    earlier = instances.start(sandbox(app_layer(command=["sleep", "600"]), name="earlier"))
    watcher = subprocess.Popen([sys.executable, "-m", "bblctl", "ps", "--watch", "--json"],
                               env=instances.env, stdout=subprocess.PIPE, text=True)
    try:
        running = json.loads(read_line(watcher.stdout))  # what runs already comes first
        assert (running["event"], running["id"], running["name"]) == (
            "running", earlier, "earlier")
        assert wait_until(lambda: _daemon_status(instances)["watchers"] == 1)  # subscribed
        instance = instances.start(sandbox(app_layer(command=["sleep", "600"]), name="watched"))
        started = json.loads(read_line(watcher.stdout))
        assert (started["event"], started["id"], started["name"]) == (
            "started", instance, "watched")
        instances.ctl("stop", instance, "--timeout", "5")
        ended = json.loads(read_line(watcher.stdout))
        assert (ended["event"], ended["id"], ended["status"]) == ("exited", instance, 143)
    finally:
        watcher.kill()
        watcher.wait(timeout=10)


def test_a_detached_instance_costs_the_daemon_two_fds(instances, tmp_path):
    from tests.conftest import daemon_pid
    from tests.test_daemon_run import _open_fds

    path = tmp_path / "idle.toml"
    path.write_text('command = ["sleep", "600"]\n')
    first = instances.ctl("start", str(path), "--detach").stdout.strip()
    instances.ids.append(first)
    pid = daemon_pid(instances.env)
    before = _open_fds(pid)
    for _ in range(5):
        instances.ids.append(instances.ctl("start", str(path), "--detach").stdout.strip())
    assert _open_fds(pid) - before == 5 * 2  # the monitor's pidfd and its watch connection


def test_a_silent_peer_on_the_control_socket_stalls_nothing(instances, app):
    import socket

    instance, _ = app
    path = os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl", "instances",
                        f"{instance}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as silent:
        silent.connect(path)  # and says nothing
        started = time.monotonic()
        result = instances.ctl("exec", instance, "--", "true")
        assert result.returncode == 0 and time.monotonic() - started < 3, result.stderr


def _daemon_status(instances) -> dict:
    return json.loads(instances.ctl("daemon", "status", "--json").stdout)
