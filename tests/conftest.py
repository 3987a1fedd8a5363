"""Helpers for tests that run real sandboxes through `python -m bbld.engine`.

Every sandbox a test starts has die_with_parent set, runs under a timeout, and is killed by
pid (its monitor; layer 1 then dies by PDEATHSIG) if the test gives up on it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ENGINE = [sys.executable, "-m", "bbld.engine"]
TIMEOUT = 60


def pytest_collection_modifyitems(config, items):
    """When the suite runs as root, only `root` tests run (the unprivileged pass did the rest)."""
    if os.getuid() != 0 or config.getoption("markexpr"):
        return
    skip = pytest.mark.skip(reason="sandbox tests run as an unprivileged user (tests/run.sh)")
    for item in items:
        if "root" not in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- the invoking user's own


USER_DIRECTORIES = ("HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_DATA_HOME",
                    "XDG_RUNTIME_DIR")


@pytest.fixture(autouse=True)
def own_directories(tmp_path_factory, monkeypatch):
    """Every test has a home, config, state, data and runtime directory of its own, so that
    whatever it starts (a daemon by autostart, a profile lookup, a launcher) never reaches
    the invoking user's (the sentinel below proves it)."""
    base = tmp_path_factory.mktemp("user")
    for name in USER_DIRECTORIES:
        path = base / name.lower()
        path.mkdir(mode=0o700)
        monkeypatch.setenv(name, str(path))


@pytest.fixture(scope="session", autouse=True)
def sentinel():
    """The invoking user's own bbld, at the place their environment names, must answer with
    the same pid and the same instances after the suite as before. If none runs, a sentinel
    bbld with one instance stands in for it for the length of the suite (then it ends)."""
    if os.getuid() == 0:  # (the root pass runs a few root tests only)
        yield
        return
    from bblctl.client import connect
    from bbld import paths

    environ = dict(os.environ)  # the user's, before own_directories
    place = paths.runtime_dir()
    made = [p for p in (place, os.path.dirname(place), paths.state_dir(),
                        os.path.join(paths.state_dir(), "history.jsonl"))
            if not os.path.exists(p)]
    daemon = None
    try:
        with connect(autostart=False) as conn:
            before = conn.call("io.bbl.Manager.Ping")["pid"], _instance_ids(conn)
    except Exception:  # noqa: BLE001 (none runs: the sentinel stands in)
        daemon = subprocess.Popen(BBLD, env=environ, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_socket(paths.socket_path(), daemon)
        before = daemon.pid, [_sentinel_instance(connect)]
    try:
        yield
    finally:
        saved = {name: os.environ.get(name) for name in USER_DIRECTORIES}
        os.environ.update({k: v for k, v in environ.items() if k in USER_DIRECTORIES})
        try:
            with connect(autostart=False) as conn:
                after = conn.call("io.bbl.Manager.Ping")["pid"], _instance_ids(conn)
                if daemon is not None:
                    for instance in before[1]:
                        conn.call("io.bbl.Manager.Signal", id=instance, signal=9)
                    conn.call("io.bbl.Manager.Quit")
        finally:
            if daemon is not None:
                daemon.wait(timeout=TIMEOUT)
                for path in made:  # (what the sentinel made at the user's place)
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    elif os.path.exists(path):
                        os.unlink(path)
            for name, value in saved.items():
                if value is not None:
                    os.environ[name] = value
        assert after[0] == before[0] and set(before[1]) <= set(after[1]), \
            f"the suite touched the user's own bbld: {before} -> {after}"


def _instance_ids(conn) -> list[str]:
    return [entry["id"] for entry in conn.call("io.bbl.Manager.List", brief=True)["instances"]]


def _sentinel_instance(connect) -> str:
    spec = json.dumps({"name": "sentinel", "layer": {"name": "sentinel", "namespaces": [
        "user", "mount", "pid"], "command": {"argv": ["sleep", "3600"]}}})
    null = os.open(os.devnull, os.O_RDWR)
    root = os.open("/", os.O_PATH)
    try:
        with connect(autostart=False) as conn:
            for reply in conn.stream("io.bbl.Manager.Run", fds=(null, null, null, root),
                                     spec=spec, args=[], env={"PATH": "/usr/bin:/bin"}):
                return reply["id"]
    finally:
        os.close(null)
        os.close(root)


# ---------------------------------------------------------------- spec builders


def system_ops(dev: bool = True) -> list[dict]:
    """A minimal system view: /usr and /etc read-only, merged-usr links, /proc, /dev, /tmp."""
    ops = [{"op": "ro-bind", "src": "/usr", "dest": "/usr"},
           {"op": "ro-bind", "src": "/etc", "dest": "/etc"}]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        target = Path("/") / name
        if target.is_symlink():
            ops.append({"op": "symlink", "target": os.readlink(target), "dest": f"/{name}"})
    ops.append({"op": "proc", "dest": "/proc"})
    if dev:
        ops.append({"op": "dev", "dest": "/dev"})
    ops.append({"op": "tmpfs", "dest": "/tmp"})
    return ops


def layer(name: str, **keys) -> dict:
    return {"name": name, **keys}


def app_layer(name: str = "app", command=None, **keys) -> dict:
    """A layer in its own user/mount/pid namespaces with a new root, mapped to uid 0."""
    base = {"namespaces": ["user", "mount", "pid"], "uid": 0, "gid": 0, "new_root": True,
            "fs": system_ops()}
    if command is not None:
        base["command"] = command
    return layer(name, **{**base, **keys})


def sandbox(root: dict, **keys) -> dict:
    return {"layer": root, "die_with_parent": True, **keys}


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def py(code: str) -> list[str]:
    return ["python3", "-c", code]


# ---------------------------------------------------------------- running


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    info: list[dict] = field(default_factory=list)

    def layer(self, name: str) -> dict:
        return next(entry for entry in self.info if entry["layer"] == name)


class Running:
    """A sandbox started in the background; `info` is available once it runs."""

    def __init__(self, proc: subprocess.Popen, info: list[dict]):
        self.proc = proc
        self.info = info

    def layer(self, name: str) -> dict:
        return next(entry for entry in self.info if entry["layer"] == name)

    def finish(self, timeout: float = TIMEOUT) -> Result:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return Result(self.proc.returncode, out, err, self.info)


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec, default=_encode_bytes))
    return path


def _encode_bytes(value):
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(type(value))


def start_sandbox(tmp_path: Path, spec: dict, args=(), pass_fds=(), stdin=subprocess.DEVNULL,
                  stdout=subprocess.PIPE, **popen) -> Running:
    """Start a sandbox and wait until it runs (or failed to start)."""
    path = write_spec(tmp_path, spec)
    info_r, info_w = os.pipe()
    proc = subprocess.Popen([*ENGINE, "--info-fd", str(info_w), str(path), "--", *args],
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            pass_fds=(info_w, *pass_fds), **popen)
    os.close(info_w)
    with os.fdopen(info_r) as lines:
        info = [json.loads(line) for line in lines]
    return Running(proc, info)


def run_sandbox(tmp_path: Path, spec: dict, args=(), timeout: float = TIMEOUT, **kw) -> Result:
    return start_sandbox(tmp_path, spec, args, **kw).finish(timeout)


def run_engine(*argv, timeout: float = TIMEOUT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*ENGINE, *argv], capture_output=True, text=True, timeout=timeout,
                          **kw)


def read_line(stream, timeout: float = TIMEOUT) -> str:
    """stream.readline(), but a test that waits for a line never hangs: after `timeout`
    seconds it fails (the reader thread ends when the test's cleanup closes the stream)."""
    import threading

    result = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise AssertionError(f"no line within {timeout} s")
    return result[0]


# ---------------------------------------------------------------- leftovers


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains `marker` (other than this test process)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def _running(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's zombie waits for a slow init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout: float = 10) -> bool:
    """Wait until condition() is true (polling the thing itself, with a deadline)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_gone(pids, timeout: float = 10) -> list[int]:
    """Wait until none of `pids` exists; returns those still alive after `timeout`."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        if alive:
            time.sleep(0.02)
    return alive


@pytest.fixture
def marker(request) -> str:
    """A string unique to this test, to find (and check for) its processes."""
    return f"bbl-test-{os.getpid()}-{request.node.name}"[:80]


# ---------------------------------------------------------------- a delegated cgroup


def _own_cgroup() -> str | None:
    """This process's cgroup v2 directory, if cgroup2 is mounted."""
    with open("/proc/self/mountinfo") as f:
        roots = [line.split()[4] for line in f if line.split(" - ")[1].startswith("cgroup2 ")]
    with open("/proc/self/cgroup") as f:
        path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    return roots[0] + path if roots and path else None


@pytest.fixture
def pids_cgroup(request):
    """A fresh cgroup for BBL_CGROUP under the delegated one tests/run.sh makes as root (as
    systemd's Delegate= would), skipped without one. It must be empty again afterwards: the
    instances' cgroups were removed."""
    delegated = os.environ.get("BBL_TEST_CGROUP", "")
    own = _own_cgroup() or ""
    if not delegated or not own.startswith(delegated + "/"):
        pytest.skip("no delegated cgroup v2 with the pids controller here (tests/run.sh, run "
                    "as root, makes one where cgroup v2 has the pids controller)")
    path = os.path.join(delegated, f"t-{os.getpid()}-{request.node.name}"[:200])
    os.mkdir(path)
    try:
        yield path
        deadline = time.monotonic() + 10  # the monitor removes them as the instance ends
        while _subdirectories(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _subdirectories(path) == []
    finally:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:  # what the test left, if any
            f.write("1")
        deadline = time.monotonic() + 10
        while "populated 1" in open(os.path.join(path, "cgroup.events")).read() and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        for directory in sorted(_subdirectories(path), reverse=True):
            os.rmdir(directory)
        os.rmdir(path)


def _subdirectories(path: str) -> list[str]:
    return [os.path.join(top, name) for top, names, _ in os.walk(path) for name in names]


# ---------------------------------------------------------------- the daemon


BBLD = [sys.executable, "-m", "bbld.daemon.main"]


def wait_for_socket(path, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"bbld exited: {proc.stderr.read()}")
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
                return
        except OSError:
            time.sleep(0.01)
    raise AssertionError("bbld did not listen in time")


@pytest.fixture
def daemon(tmp_path):
    """A bbld serving $XDG_RUNTIME_DIR=tmp_path/run; yields its socket path."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run)}
    proc = subprocess.Popen(BBLD, env=env, stderr=subprocess.PIPE, text=True)
    path = run / "bbl" / "bbld.sock"
    try:
        wait_for_socket(path, proc)
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    assert not path.exists()  # the socket is removed at the end
    assert os.listdir(run / "bbl") == []


# ---------------------------------------------------------------- instances through bbld


BBLCTL = [sys.executable, "-m", "bblctl"]


def daemon_pid(env: dict) -> int | None:
    code = ("from bblctl.client import connect\ntry:\n print(connect(autostart=False).call("
            "'io.bbl.Manager.Ping')['pid'])\nexcept Exception: pass")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=20).stdout.strip()
    return int(out) if out else None


@pytest.fixture
def bbl_env(tmp_path):
    """The environment of a private daemon (its own XDG_RUNTIME_DIR, started on first use by
    the client); it is ended by pid afterwards."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    environment = {**os.environ, "XDG_RUNTIME_DIR": str(run),
                   "XDG_STATE_HOME": str(tmp_path / "state")}
    yield environment
    pid = daemon_pid(environment)
    if pid:
        os.kill(pid, signal.SIGTERM)
        wait_gone([pid])


class Instances:
    """Start specs as daemon instances (each held by a tests.launch client) and run bblctl."""

    def __init__(self, env: dict, tmp_path: Path):
        self.env, self.tmp = env, tmp_path
        self.launchers: list[subprocess.Popen] = []
        self.ids: list[str] = []

    def start(self, spec: dict, **popen) -> str:
        n = len(self.launchers)
        spec_path, id_path = self.tmp / f"spec{n}.json", self.tmp / f"id{n}"
        spec_path.write_text(json.dumps(spec))
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([sys.executable, "-m", "tests.launch", str(spec_path),
                                 str(id_path)], env=self.env, **popen)
        self.launchers.append(proc)
        deadline = time.monotonic() + TIMEOUT
        while not id_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the instance did not start ({proc.returncode})")
            time.sleep(0.01)
        self.ids.append(id_path.read_text())
        return self.ids[-1]

    def ctl(self, *argv, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", TIMEOUT)
        return subprocess.run([*BBLCTL, *argv], env=self.env, capture_output=True, text=True,
                              **kw)

    def close(self) -> None:
        if daemon_pid(self.env):  # every instance it runs (also those a test started itself)
            listed = self.ctl("ps", "--json").stdout
            for instance in {*self.ids, *(e["id"] for e in json.loads(listed or "[]"))}:
                self.ctl("stop", instance, "--timeout", "0")
        for proc in self.launchers:
            proc.kill()
            proc.wait(timeout=TIMEOUT)


@pytest.fixture
def instances(bbl_env, tmp_path):
    started = Instances(bbl_env, tmp_path)
    try:
        yield started
    finally:
        started.close()


class Session:
    """A bblctl command (attach, start, run) with a pty of ours as its controlling terminal
    and stdio, as on a user's terminal."""

    def __init__(self, argv: list[str], env: dict):
        import fcntl
        import termios

        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, _winsize(24, 80))
        self.modes = termios.tcgetattr(self.slave)

        def controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen([sys.executable, "-m", "bblctl", *argv], env=env,
                                     stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     preexec_fn=controlling_terminal)
        self.seen = b""

    def expect(self, text: str, timeout: float = 30) -> str:
        import select

        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {text!r}; saw {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:
                    break
        found = self.seen.decode(errors="replace")
        self.seen = self.seen[self.seen.index(text.encode()) + len(text):]
        return found

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import termios

        fcntl.ioctl(self.master, termios.TIOCSWINSZ, _winsize(rows, cols))  # SIGWINCH to it

    def interrupt_and_exit(self, status: int = 6) -> None:
        """Ctrl-C ends the shell's foreground job, not the shell (status 130 after it); the
        shell's `exit` ends the session with its status, and the local terminal's modes are
        back as they were."""
        import termios

        self.send("\x03")
        self.expect("$ ")
        self.send("echo alive $?\r")
        assert "alive 130" in self.expect("130")
        self.send(f"exit {status}\r")
        assert self.proc.wait(timeout=30) == status
        assert termios.tcgetattr(self.slave) == self.modes  # raw mode undone

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self.master)
        os.close(self.slave)


def _winsize(rows: int, cols: int) -> bytes:
    import struct

    return struct.pack("HHHH", rows, cols, 0, 0)
