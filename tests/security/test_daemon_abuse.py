"""bbld, its monitors and bblctl under attack and load: another user, the user's own hostile
input, and a sandbox that sees BBL's files. Each test tries what a red-team pass did."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import BBLD, TIMEOUT, daemon_pid, read_line, wait_for_socket, wait_gone

BBLCTL = [sys.executable, "-m", "bblctl"]
BBL_BWRAP = [sys.executable, "-m", "bblctl.run"]
ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x1b[1;31mFAKE: sudo password\u202e"


def run(env, argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT, **kw)


def ctl(env, *argv, **kw) -> subprocess.CompletedProcess:
    return run(env, [*BBLCTL, *argv], **kw)


def runtime(env) -> Path:
    return Path(env["XDG_RUNTIME_DIR"]) / "bbl"


def profile(tmp_path: Path, text: str, name: str = "p.toml") -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    return str(path)


def monitor_of(env, instance: str) -> int:
    """The pid of an instance's monitor: the parent of its layer 1."""
    (tree,) = json.loads(ctl(env, "tree", instance, "--json").stdout)
    layer1 = tree["layers"][0]["pid"]
    with open(f"/proc/{layer1}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


# ---------------------------------------------------------------- 1. whom the client trusts


def _listener(command: list[str], path: Path, received: Path) -> subprocess.Popen:
    """A process (after `command`) listening at `path` that writes how many bytes each
    connection sent it to `received`."""
    code = ("import socket, sys, os\n"
            "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666)\n"
            "s.listen(8); print('ready', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.settimeout(3); n = 0\n"
            "    try:\n"
            "        while (d := c.recv(65536)): n += len(d)\n"
            "    except OSError: pass\n"
            "    open(sys.argv[2], 'a').write(f'{n}\\n'); c.close()\n")
    proc = subprocess.Popen([*command, sys.executable, "-c", code, str(path), str(received)],
                            stdout=subprocess.PIPE, text=True)
    assert read_line(proc.stdout) == "ready\n"
    return proc


def test_the_client_sends_nothing_to_a_listener_in_a_sandbox(bbl_env, tmp_path):
    """A sandbox that could write the runtime directory listens at bbld's socket: the client
    checks its server as bbld checks its callers, and gives it no byte (no environment, no
    stdio)."""
    runtime(bbl_env).mkdir(mode=0o700)
    received = tmp_path / "received"
    listener = _listener(["unshare", "--user"], runtime(bbl_env) / "bbld.sock", received)
    try:
        result = run({**bbl_env, "SECRET_TOKEN": "hunter2"},
                     [*BBL_BWRAP, "--ro-bind", "/", "/", "true"])
        assert result.returncode == 1
        assert result.stderr == (f"bwrap: {runtime(bbl_env)}/bbld.sock is not your bbld: its "
                                 "server runs in another user namespace than this client; "
                                 "remove it\n")
        listed = ctl(bbl_env, "ps")
        assert listed.returncode == 1 and "is not your bbld" in listed.stderr
    finally:
        listener.kill()
        listener.wait()
    assert set(received.read_text().split()) == {"0"}  # it connected, it got nothing


@pytest.mark.root
@pytest.mark.skipif(os.getuid() != 0, reason="another user's listener takes root")
def test_the_client_sends_nothing_to_another_users_listener(tmp_path):
    user = os.environ.get("BBL_TEST_USER", "bbltest")
    base = Path(tempfile.mkdtemp(prefix="bbl-shared-"))
    os.chmod(base, 0o755)
    try:
        (base / "run" / "bbl").mkdir(parents=True, mode=0o755)  # root's, as a planted one
        received = base / "received"
        listener = _listener([], base / "run" / "bbl" / "bbld.sock", received)
        try:
            result = subprocess.run(
                ["runuser", "-u", user, "--", "env", f"XDG_RUNTIME_DIR={base / 'run'}",
                 "SECRET_TOKEN=hunter2", *BBL_BWRAP, "--ro-bind", "/", "/", "true"],
                capture_output=True, text=True, timeout=TIMEOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            assert result.returncode == 1
            assert "is served by uid 0, not by you" in result.stderr, result.stderr
        finally:
            listener.kill()
            listener.wait()
        assert set(received.read_text().split()) == {"0"}
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("where", ["state", "parent"])
def test_an_autostart_refuses_a_state_directory_others_may_change(bbl_env, tmp_path, where):
    shared = tmp_path / "shared"
    state = shared / "state"
    (state / "bbl").mkdir(parents=True)
    os.chmod(state / "bbl" if where == "state" else shared, 0o777)
    env = {**bbl_env, "XDG_STATE_HOME": str(state)}
    result = ctl(env, "ps")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("bblctl: cannot start bbld: ")
    assert ("has mode 0777" if where == "state" else "may be written by anyone") in result.stderr
    assert os.listdir(state / "bbl") == [] and daemon_pid(env) is None


def test_an_autostart_never_writes_through_a_link(bbl_env, tmp_path):
    state = Path(bbl_env["XDG_STATE_HOME"]) / "bbl"
    state.mkdir(parents=True, mode=0o700)
    victim = tmp_path / "profile-of-the-user"
    victim.write_text("unchanged\n")
    (state / "bbld.log").symlink_to(victim)
    result = ctl(bbl_env, "ps")
    assert result.returncode == 1 and "bbld did not start" in result.stderr
    assert victim.read_text() == "unchanged\n"


@pytest.mark.parametrize("loose", ["directory", "file"])
def test_a_profile_others_may_change_is_refused(bbl_env, tmp_path, loose):
    profiles = tmp_path / "config" / "bbl" / "profiles"
    profiles.mkdir(parents=True)
    (profiles / "x.toml").write_text('command = ["true"]\n')
    os.chmod(profiles if loose == "directory" else profiles / "x.toml", 0o777)
    env = {**bbl_env, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    for attempt in ("no daemon yet", "through bbld"):
        result = ctl(env, "start", "x")
        assert result.returncode == 2, (attempt, result.stderr)
        assert result.stderr.count("\n") == 1 and "refused: " in result.stderr
        assert ("has mode 0777" if loose == "file" else "may be written by anyone") in \
            result.stderr
        assert ctl(env, "ps").returncode == 0  # (bbld runs for the second attempt)


def test_a_huge_or_endless_profile_is_refused_at_once(bbl_env, tmp_path):
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(2 << 20)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert ctl(bbl_env, "ps").returncode == 0  # bbld runs: it expands the profiles
    pid = daemon_pid(bbl_env)
    assert ctl(bbl_env, "start", str(big)).stderr == (
        f"bblctl: {big}: 2097152 bytes; a profile is at most 1 MiB\n")
    assert ctl(bbl_env, "start", str(fifo)).stderr == f"bblctl: {fifo}: not a regular file\n"
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert rss < 200_000  # kB


# ---------------------------------------------------------------- 2. terminal escapes


def test_what_a_sandbox_names_itself_reaches_no_terminal_raw(instances, tmp_path):
    code = f"import os; os.execv('/bin/sleep', [{ESCAPES!r}, '600'])"
    path = profile(tmp_path, f"command = {json.dumps(['python3', '-c', code])}")
    started = instances.ctl("start", path, "--detach")
    assert started.returncode == 0, started.stderr
    instance = started.stdout.strip()
    instances.ids.append(instance)
    deadline = time.monotonic() + 10
    while "PWNED" not in (shown := instances.ctl("tree", instance).stdout):
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)
    listed = instances.ctl("ps").stdout
    failed = instances.ctl("exec", instance, "--", ESCAPES)
    assert failed.returncode != 0
    for output in (shown, listed, failed.stderr):
        assert not any(ord(c) < 0x20 and c != "\n" or c == "\u202e" for c in output), output
    assert "\\x1b]0;PWNED\\x07\\x1b[2J" in shown and "\\u202e" in shown
    assert "\\x1b]0;PWNED" in listed and "\\x1b]0;PWNED" in failed.stderr


# ---------------------------------------------------------------- 3. load


def test_two_hundred_concurrent_starts_are_all_answered(bbl_env):
    """Each with a realistic environment (about 10 KB): every call ends with its command's
    status or a typed error, none with a dropped connection."""
    assert ctl(bbl_env, "ps").returncode == 0
    path = str(runtime(bbl_env) / "bbld.sock")
    spec = json.dumps({"layer": {"name": "l", "command": {"argv": ["true"]}}})
    environment = {f"VARIABLE_{n}": "x" * 100 for n in range(100)}
    message = json.dumps({"method": "io.bbl.Manager.Run", "more": True, "parameters": {
        "spec": spec, "args": [], "env": environment}}).encode() + b"\0"
    null = os.open(os.devnull, os.O_RDWR)
    root = os.open("/", os.O_PATH)
    calls = []
    try:
        for _ in range(200):
            call = socket.socket(socket.AF_UNIX)
            call.connect(path)
            socket.send_fds(call, [message], [null, null, null, root])
            calls.append(call)
        outcomes = _outcomes(calls)
    finally:
        for call in calls:
            call.close()
        os.close(null)
        os.close(root)
    assert len(outcomes) == 200
    dropped = [o for o in outcomes if not (o == "exited 0" or o.startswith("io.bbl."))]
    assert dropped == [] and outcomes.count("exited 0") >= 190, sorted(set(outcomes))
    assert os.listdir(runtime(bbl_env) / "instances") == []


def _outcomes(calls) -> list[str]:
    buffers = {call: b"" for call in calls}
    done: dict = {}
    deadline = time.monotonic() + 120
    while len(done) < len(calls) and time.monotonic() < deadline:
        for call in select.select([c for c in calls if c not in done], [], [], 5)[0]:
            data = call.recv(65536)
            if not data:
                done[call] = "dropped"
                continue
            buffers[call] += data
            for frame in buffers[call].split(b"\0")[:-1]:
                reply = json.loads(frame)
                if reply.get("error"):
                    done[call] = reply["error"]
                elif reply["parameters"].get("event") == "exited":
                    done[call] = f"exited {reply['parameters']['status']}"
    return list(done.values())


# ---------------------------------------------------------------- 4. desktop entries


def test_a_launcher_holds_no_injected_line(bbl_env, tmp_path):
    data = tmp_path / "data"
    env = {**bbl_env, "XDG_DATA_HOME": str(data)}
    hostile = profile(tmp_path, 'command = ["true"]',
                      'app\nExec=sh -c "touch desktop-pwned"\nX-Y=.toml')
    result = ctl(env, "desktop", "install", hostile)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert not (data / "applications").exists() or os.listdir(data / "applications") == []
    by_path = profile(tmp_path, 'name = "app"\ncommand = ["true"]', "my app.toml")
    installed = ctl(env, "desktop", "install", by_path)
    assert installed.returncode == 0, installed.stderr
    launcher = Path(installed.stdout.strip())
    assert launcher == data / "applications" / "bbl-my_app.desktop"
    text = launcher.read_text()
    assert f'start "{by_path}" -- %U' in text
    relative = ctl(env, "desktop", "install", "my app.toml", cwd=tmp_path)
    assert relative.returncode == 0 and f'"{by_path}"' in Path(relative.stdout.strip()).read_text()
    if shutil.which("desktop-file-validate"):
        check = subprocess.run(["desktop-file-validate", str(launcher)], capture_output=True,
                               text=True, timeout=TIMEOUT)
        assert check.returncode == 0, check.stdout + check.stderr


# ---------------------------------------------------------------- 5. readiness


def test_a_false_ready_does_not_fail_an_autostart(tmp_path):
    """Anyone can see the client's notify socket in /proc/net/unix and send it READY=1 (here
    the same user, which can do what another could and more): only bbld's counts."""
    stop = threading.Event()

    def spoof():
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            while not stop.is_set():
                with open("/proc/net/unix") as f:
                    names = [line.split()[-1] for line in f if "@bbl-notify-" in line]
                for name in names:
                    try:
                        sender.sendto(b"READY=1", "\0" + name[1:])
                    except OSError:
                        pass
                time.sleep(0.0005)

    spoofer = threading.Thread(target=spoof)
    spoofer.start()
    pids = []
    try:
        for n in range(3):
            (tmp_path / f"run{n}").mkdir(mode=0o700)
            env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / f"run{n}"),
                   "XDG_STATE_HOME": str(tmp_path / f"state{n}")}
            result = ctl(env, "ps")
            pids.append(daemon_pid(env))
            assert result.returncode == 0, result.stderr
    finally:
        stop.set()
        spoofer.join()
        for pid in pids:
            if pid:
                os.kill(pid, signal.SIGTERM)
        wait_gone([pid for pid in pids if pid])


# ---------------------------------------------------------------- 6. the monitor's own fds


@pytest.mark.parametrize("option", [["--info-fd", "1000"], ["--json-status-fd", "1000"],
                                    ["--args", "1000"], ["--block-fd", "1000"],
                                    ["--seccomp", "1000"], ["--file", "1000", "/tmp/x"],
                                    ["--ro-bind-data", "1000", "/tmp/x"],
                                    ["--sync-fd", "1001"]])
def test_fd_options_name_only_the_callers_fds(bbl_env, option):
    """fd 1000 is the monitor's report channel to bbld: as in bubblewrap, only the caller's
    fds are open to a command line (here none but stdio)."""
    assert ctl(bbl_env, "ps").returncode == 0  # bbld runs: the monitor parses
    result = run(bbl_env, [*BBL_BWRAP, "--ro-bind", "/", "/", "--tmpfs", "/tmp", *option,
                           "--", "sleep", "5"])
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("bwrap: ")
    assert json.loads(ctl(bbl_env, "ps", "--all", "--json").stdout) == []
    assert os.listdir(runtime(bbl_env) / "instances") == []


def test_a_second_ending_signal_ends_a_client_whose_sandbox_waits(bbl_env):
    """bwrap waiting on --block-fd dies of Ctrl-C; bbl-bwrap keeps the first signal for the
    command it has not started yet, and dies of the second."""
    assert ctl(bbl_env, "ps").returncode == 0
    block_r, block_w = os.pipe()
    os.set_inheritable(block_r, True)
    client = subprocess.Popen([*BBL_BWRAP, "--ro-bind", "/", "/", "--block-fd",
                               str(block_r), "true"], env=bbl_env, pass_fds=[block_r],
                              stderr=subprocess.PIPE, text=True)
    os.close(block_r)
    try:
        deadline = time.monotonic() + 10
        while not json.loads(ctl(bbl_env, "ps", "--all", "--json").stdout) and \
                not list((runtime(bbl_env) / "instances").glob("*")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):  # the first waits for the command
            client.wait(timeout=0.5)
        client.send_signal(signal.SIGINT)
        assert client.wait(timeout=10) == -signal.SIGINT
    finally:
        client.kill()
        client.wait()
        os.close(block_w)  # the sandbox starts, runs true and ends
    deadline = time.monotonic() + 20
    while os.listdir(runtime(bbl_env) / "instances"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ---------------------------------------------------------------- 7. bbld's start-up


@pytest.fixture
def planted(tmp_path):
    """A runtime directory for a bbld started by hand; yields (instances dir, start)."""
    run_dir = tmp_path / "run"
    (run_dir / "bbl").mkdir(parents=True, mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run_dir)}
    started = []

    def start():
        proc = subprocess.Popen(BBLD, env=env, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield run_dir / "bbl" / "instances", start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=TIMEOUT)


def test_bbld_refuses_an_instances_directory_that_is_a_link(planted, tmp_path):
    instances, start = planted
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "0123456789abcdef.exited").write_text("my thesis")
    instances.symlink_to(documents)
    proc = start()
    assert proc.wait(timeout=TIMEOUT) == 1
    assert proc.stderr.read() == f"bbld: {instances} is not a directory; remove it and try again\n"
    assert os.listdir(documents) == ["0123456789abcdef.exited"]
    assert os.listdir(instances.parent) == ["instances"]  # no socket left behind


@pytest.mark.parametrize("kind", ["fifo", "directory", "link", "loose"])
def test_bbld_starts_past_strange_entries_and_leaves_them(planted, tmp_path, kind):
    instances, start = planted
    instances.mkdir(mode=0o700)
    entry = instances / "0123456789abcdef.exited"
    victim = tmp_path / "victim"
    victim.write_text('{"id": "0123456789abcdef", "status": 0}')
    if kind == "fifo":
        os.mkfifo(entry)
    elif kind == "directory":
        entry.mkdir()
    elif kind == "link":
        entry.symlink_to(victim)
    else:
        os.chmod(instances, 0o755)
    proc = start()
    if kind == "loose":
        assert proc.wait(timeout=TIMEOUT) == 1
        assert proc.stderr.read() == (f"bbld: {instances} has mode 0755; run "
                                      f"`chmod 700 {instances}`\n")
        return
    wait_for_socket(instances.parent / "bbld.sock", proc)
    assert os.path.lexists(entry) and victim.exists()


def test_a_stopped_monitor_does_not_hold_up_a_new_bbld(instances, tmp_path):
    path = profile(tmp_path, 'command = ["sleep", "600"]')
    started = instances.ctl("start", path, "--detach")
    instance = started.stdout.strip()
    instances.ids.append(instance)
    monitor = monitor_of(instances.env, instance)
    old = daemon_pid(instances.env)
    os.kill(old, signal.SIGTERM)
    assert wait_gone([old]) == []
    os.kill(monitor, signal.SIGSTOP)
    try:
        begin = time.monotonic()
        listed = instances.ctl("ps", "--json")  # starts a new bbld
        assert listed.returncode == 0 and time.monotonic() - begin < 8, listed.stderr
        assert json.loads(listed.stdout) == []  # not yet adopted
    finally:
        os.kill(monitor, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while [e["id"] for e in json.loads(instances.ctl("ps", "--json").stdout)] != [instance]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.root
@pytest.mark.skipif(os.getuid() != 0, reason="a root-owned directory takes root")
def test_bbld_refuses_an_instances_directory_of_another_user():
    user = os.environ.get("BBL_TEST_USER", "bbltest")
    base = Path(tempfile.mkdtemp(prefix="bbl-instances-"))
    os.chmod(base, 0o755)
    try:
        (base / "bbl" / "instances").mkdir(parents=True)
        os.chmod(base / "bbl", 0o700)
        shutil.chown(base / "bbl", user)  # the runtime dir is theirs, instances/ is root's
        result = subprocess.run(["runuser", "-u", user, "--", "env", f"XDG_RUNTIME_DIR={base}",
                                 *BBLD], capture_output=True, text=True, timeout=TIMEOUT,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert result.returncode == 1
        assert result.stderr == (f"bbld: {base}/bbl/instances belongs to uid 0, not to you; "
                                 "remove it\n")
    finally:
        shutil.rmtree(base)


# ---------------------------------------------------------------- 9. bbld's environment


def test_an_autostarted_bbld_keeps_nothing_of_its_starters_environment(bbl_env, tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\nopen(os.path.join(os.path.dirname(__file__), str(os.getpid())), 'w')\n")
    env = {**bbl_env, "PYTHONPATH": str(inject), "FIRST_CLIENT_SECRET": "hunter2",
           "LD_PRELOAD": "libc.so.6"}
    assert run(env, [*BBL_BWRAP, "--ro-bind", "/", "/", "sleep", "0.5"]).returncode == 0
    daemon = daemon_pid(bbl_env)
    processes = [daemon, *_descendants(daemon)]
    assert len(processes) >= 2  # bbld, its forker (and its spare)
    for pid in processes:
        with open(f"/proc/{pid}/environ", "rb") as f:
            names = {item.partition(b"=")[0] for item in f.read().split(b"\0")}
        assert not names & {b"PYTHONPATH", b"FIRST_CLIENT_SECRET", b"LD_PRELOAD"}, pid
        assert not (inject / str(pid)).exists()


def _descendants(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in map(int, f.read().split()):
                found += [child, *_descendants(child)]
    return found


# ---------------------------------------------------------------- 10. forwarding


def _run_call(path: str, spec: dict):
    call = socket.socket(socket.AF_UNIX)
    call.settimeout(TIMEOUT)
    call.connect(path)
    null = os.open(os.devnull, os.O_RDWR)
    root = os.open("/", os.O_PATH)
    try:
        message = json.dumps({"method": "io.bbl.Manager.Run", "more": True, "parameters": {
            "spec": json.dumps(spec), "args": [], "env": {}}}).encode() + b"\0"
        socket.send_fds(call, [message], [null, null, null, root])
    finally:
        os.close(null)
        os.close(root)
    return call


def _first_reply(call) -> dict:
    data = b""
    while b"\0" not in data:
        chunk = call.recv(65536)
        assert chunk, data
        data += chunk
    return json.loads(data.split(b"\0")[0])


def test_a_forward_that_cannot_be_made_is_answered(instances):
    assert instances.ctl("ps").returncode == 0
    path = str(runtime(instances.env) / "bbld.sock")
    solo = {"name": "solo", "single_instance": True,
            "layer": {"name": "l", "command": {"argv": ["sleep", "600"]}}}
    first = _run_call(path, solo)
    started = _first_reply(first)
    assert started["parameters"].get("event") == "started", started
    instances.ids.append(started["parameters"]["id"])
    broken = _run_call(path, {"name": "solo", "single_instance": True,
                              "layer": {"name": "l", "bogus": 1}})
    reply = _first_reply(broken)
    assert reply["error"] == "io.bbl.Manager.StartFailed" and \
        reply["parameters"]["exit_code"] == 2, reply
    # Its monitor can no longer be reached (it is ending): a new start makes a new one.
    os.unlink(runtime(instances.env) / "instances" / f"{started['parameters']['id']}.sock")
    layer1 = started["parameters"]["layers"][0]["pid"]
    try:
        second = _run_call(path, solo)
        again = _first_reply(second)
        assert again["parameters"]["event"] == "started", again
        assert again["parameters"]["id"] != started["parameters"]["id"]
        instances.ids.append(again["parameters"]["id"])
    finally:
        os.kill(layer1, signal.SIGKILL)  # (unreachable now: ended by its layer 1)
        for call in (first, broken):
            call.close()
    second.close()


# ---------------------------------------------------------------- 8. limits, from outside


def test_idle_connections_beyond_the_fd_limit_do_not_lock_the_user_out(tmp_path):
    """bbld under an fd limit of 256 and 300 idle connections (what a buggy or hostile
    script of the user's can hold): the longest idle make room, `bblctl ps` is answered,
    and the log has a few lines, no tracebacks."""
    import resource

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run_dir)}
    proc = subprocess.Popen(BBLD, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                  (256, 256)))
    held = []
    try:
        path = run_dir / "bbl" / "bbld.sock"
        wait_for_socket(path, proc)
        for _ in range(300):
            idle = socket.socket(socket.AF_UNIX)
            idle.connect(str(path))
            held.append(idle)
        listed = ctl(env, "ps")
        assert listed.returncode == 0, listed.stderr
    finally:
        for idle in held:
            idle.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    log = proc.stderr.read()
    assert "Traceback" not in log and log.count("\n") <= 25, log
