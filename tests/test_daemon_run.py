"""Instances through bbld: io.bbl.Manager.Run forks them from the daemon's helper."""

import json
import os

import pytest

from bblctl.client import RemoteError
from tests.conftest import app_layer, processes_with, sandbox, sh, wait_gone


def connect(path):
    import socket

    from bblctl.client import Connection

    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    return Connection(sock)


def run_through(daemon_path, spec: dict, args=(), stdin=b""):
    """Run a spec through the daemon with pipes for stdio; returns (events, stdout, stderr)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    os.write(in_w, stdin)
    os.close(in_w)
    cwd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    events = []
    try:
        with connect(daemon_path) as conn:
            try:
                for reply in conn.stream("io.bbl.Manager.Run", fds=(in_r, out_w, err_w, cwd),
                                         spec=json.dumps(spec), args=list(args),
                                         env={"PATH": "/usr/bin:/bin"}):
                    events.append(reply)
            except RemoteError as exc:
                events.append({"error": exc.name, **exc.parameters})
    finally:
        for fd in (in_r, out_w, err_w, cwd):
            os.close(fd)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        return events, out.read().decode(), err.read().decode()


def test_run_streams_started_then_exited_with_the_status(daemon):
    spec = sandbox(app_layer(command=sh("read line; echo got $line; pwd; echo $PATH; exit 3")))
    events, out, err = run_through(daemon, spec, stdin=b"hello\n")
    started, exited = events
    assert started["event"] == "started" and started["layers"][0]["layer"] == "app"
    assert started["layers"][0]["pid"] > 1
    assert exited == {"event": "exited", "id": started["id"], "status": 3}
    assert out == "got hello\n/\n/usr/bin:/bin\n", err


def test_a_call_longer_than_one_read_keeps_its_fds(daemon):
    """The fds come with a call's first bytes; a 90 KB call arrives in several reads."""
    words = [f"word{i:06}" for i in range(8000)]
    events, out, _ = run_through(daemon, sandbox(app_layer(command=[*sh('echo "$#"'), "-"])),
                                 args=words)
    assert events[-1].get("status") == 0 and out == "8000\n", events
    words = [f"word{i:06}" for i in range(25000)]  # longer than the forker's socket takes
    events, _, _ = run_through(daemon, sandbox(app_layer(command=["true"])), args=words)
    assert events[-1]["error"] == "io.bbl.Manager.StartFailed" and events[-1]["exit_code"] == 2
    assert "is too large" in events[-1]["message"]


def test_run_with_arguments_and_a_nested_tree(daemon):
    from tests.conftest import layer

    leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=["echo"])
    events, out, _ = run_through(daemon, sandbox(app_layer("top", layers=[leaf])), args=["a", "b"])
    assert [e["layer"] for e in events[0]["layers"]] == ["top", "leaf"]
    assert out == "a b\n" and events[-1]["status"] == 0


@pytest.mark.parametrize("spec, code, message", [
    ({"layer": {"name": "x", "namespaces": ["pid"], "command": ["true"]}}, 2,
     "layer 'x': namespaces"),
    (sandbox(app_layer(command=["true"], fs=[{"op": "bind", "src": "/nope", "dest": "/x"}])),
     2, "layer 'app': fs[0] (bind) /x: source /nope does not exist"),
    (sandbox(app_layer(command=["/no/such/program"])), 2, "cannot execute"),
])
def test_start_failures_are_typed_errors(daemon, spec, code, message):
    events, out, _ = run_through(daemon, spec)
    (failure,) = events
    assert failure["error"] == "io.bbl.Manager.StartFailed"
    assert failure["exit_code"] == code and message in failure["message"]


def test_run_needs_more_and_its_four_fds(daemon):
    with connect(daemon) as conn:
        with pytest.raises(RemoteError) as err:
            conn.call("io.bbl.Manager.Run", spec="{}", args=[], env={})
        assert err.value.name == "org.varlink.service.ExpectedMore"
    with connect(daemon) as conn:
        with pytest.raises(RemoteError) as err:
            list(conn.stream("io.bbl.Manager.Run", spec="{}", args=[], env={}))
        assert err.value.parameters == {"parameter": "fds"}


@pytest.mark.parametrize("sources, named", [
    ({}, "spec"), ({"spec": "{}", "profile": "default"}, "profile"),
    ({"spec": "{}", "bwrap": ["true"]}, "bwrap"), ({"bwrap": ["true", 5]}, "bwrap"),
])
def test_run_takes_exactly_one_sandbox(daemon, sources, named):
    """A spec, a profile or a bubblewrap command line: one of them, well typed."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        with connect(daemon) as conn:
            with pytest.raises(RemoteError) as err:
                list(conn.stream("io.bbl.Manager.Run", fds=(null,) * 4, args=[], env={},
                                 **sources))
            assert (err.value.name, err.value.parameters) == (
                "org.varlink.service.InvalidParameter", {"parameter": named})
    finally:
        os.close(null)


def test_a_profile_path_must_be_absolute(daemon):
    null = os.open(os.devnull, os.O_RDWR)
    try:
        with connect(daemon) as conn:
            with pytest.raises(RemoteError) as err:
                list(conn.stream("io.bbl.Manager.Run", fds=(null,) * 4, args=[], env={},
                                 profile="mine.toml"))
        assert err.value.name == "io.bbl.Manager.StartFailed"
        assert err.value.parameters == {
            "message": "mine.toml: give the profile file's absolute path", "exit_code": 2}
    finally:
        os.close(null)


def test_instances_are_forked_by_one_helper_not_by_the_daemon(daemon, marker):
    spec = sandbox(app_layer(command={"argv": ["sleep", "0.3"], "argv0": marker}))
    events, _, _ = run_through(daemon, spec)
    supervisor = events[0]["layers"][0]["pid"]
    ping = connect(daemon).call("io.bbl.Manager.Ping")["pid"]
    assert supervisor != ping
    assert wait_gone(processes_with(marker)) == []


def test_the_registry_lists_a_running_instance_until_it_ends(daemon, marker):
    import time

    spec = sandbox(app_layer(command=[*sh("echo ready; read x"), marker]))
    spec["name"] = "listed"
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    cwd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with connect(daemon) as conn:
            before = time.time()
            replies = conn.stream("io.bbl.Manager.Run", fds=(in_r, out_w, 2, cwd),
                                  spec=json.dumps(spec), args=[], env={"PATH": "/usr/bin:/bin"})
            started = next(replies)
            assert os.read(out_r, 100) == b"ready\n"
            with connect(daemon) as other:
                (entry,) = other.call("io.bbl.Manager.List")["instances"]
                (brief,) = other.call("io.bbl.Manager.List", brief=True)["instances"]
            assert brief == {key: value for key, value in entry.items() if key != "layers"}
            assert brief["layer_count"] == 1
            assert entry["id"] == started["id"] and entry["name"] == "listed"
            assert entry["state"] == "running" and entry["status"] is None
            assert entry["command"][-1] == marker and before - 1 < entry["started"] < time.time()
            with open(f"/proc/{entry['pid']}/cmdline", "rb") as f:
                assert marker.encode() in f.read()  # the main command's own host pid
            assert [layer["layer"] for layer in entry["layers"]] == ["app"]
            os.write(in_w, b"go\n")
            assert next(replies)["status"] == 0
            with connect(daemon) as other:
                assert other.call("io.bbl.Manager.List")["instances"] == []
    finally:
        for fd in (in_r, in_w, out_r, out_w, cwd):
            os.close(fd)


def _open_fds(pid: int) -> int:
    """How many fds `pid` holds once connections that just ended are closed on its side."""
    import time

    count, deadline = -1, time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.1)
        previous, count = count, len(os.listdir(f"/proc/{pid}/fd"))
        if count == previous:
            break
    return count


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def _monitors(forker: int) -> list[int]:
    """The forker's children but its spare monitor, the youngest (forked once the one
    before took a request): the monitors of instances."""
    def started(pid):
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19]), pid  # (ticks: ties)
    return sorted(_children(forker), key=started)[:-1]


def _only_a_spare_left(forker: int) -> None:
    """Every monitor has ended; one spare waits for the next request, with no child yet."""
    assert wait_gone(_monitors(forker)) == []
    (spare,) = _children(forker)
    assert _children(spare) == []


def test_bad_input_leaves_nothing_behind_in_the_daemon(daemon, tmp_path):
    """Failed starts and malformed messages: the daemon's fds and processes are as before."""
    from tests.test_daemon import call, exchange

    run_through(daemon, sandbox(app_layer(command=["true"])))  # the helper now runs
    with connect(daemon) as conn:
        pid = conn.call("io.bbl.Manager.Ping")["pid"]
    fds_before, children_before = _open_fds(pid), _children(pid)
    (helper,) = children_before
    bad_specs = [
        {"layer": {"name": "x"}},
        sandbox(app_layer(command=["true"], fs=[{"op": "bind", "src": "/nonexistent",
                                                 "dest": "/x"}])),
        sandbox(app_layer(command=["/no/such/program"])),
        sandbox(app_layer(command=["true"], fs=[{"op": "bind-fd", "fd": 77, "dest": "/x"}])),
    ]
    for _ in range(3):
        for spec in bad_specs:
            events, _, _ = run_through(daemon, spec)
            assert events[-1]["error"] == "io.bbl.Manager.StartFailed"
        for message in (b"not json\0", b"x" * (1 << 21), call("io.bbl.Manager.Nope"),
                        call("io.bbl.Manager.Ping")[:-3]):
            exchange(daemon, message)
    _only_a_spare_left(helper)
    assert _children(pid) == children_before
    assert _open_fds(pid) == fds_before


def test_the_forker_keeps_one_spare_monitor_that_made_nothing(daemon):
    """A monitor is forked ahead of each request and rehearses one: it is in the forker's
    namespaces, has no child and holds the files the forker holds."""
    run_through(daemon, sandbox(app_layer(command=["true"])))  # the forker now runs
    with connect(daemon) as conn:
        (forker,) = _children(conn.call("io.bbl.Manager.Ping")["pid"])
    _only_a_spare_left(forker)
    (spare,) = _children(forker)
    for name in os.listdir(f"/proc/{forker}/ns"):
        assert os.readlink(f"/proc/{spare}/ns/{name}") == os.readlink(f"/proc/{forker}/ns/{name}")
    def files(pid):  # (the pipe between them: the forker's end, the spare's end)
        return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    assert files(spare) == files(forker)


def test_a_monitor_holds_no_channel_of_the_forker(daemon):
    """The spare that took a request closed the daemon's channel to the forker: an instance's
    monitor cannot send start requests of its own."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    cwd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    spec = sandbox(app_layer(command=sh("echo ready; read x")))
    run_through(daemon, sandbox(app_layer(command=["true"])))  # the forker now runs
    try:
        with connect(daemon) as conn:
            (forker,) = _children(conn.call("io.bbl.Manager.Ping")["pid"])
            replies = conn.stream("io.bbl.Manager.Run", fds=(in_r, out_w, 2, cwd),
                                  spec=json.dumps(spec), args=[], env={"PATH": "/usr/bin:/bin"})
            next(replies)
            try:
                assert os.read(out_r, 100) == b"ready\n"
                (monitor,) = [pid for pid in _children(forker) if _children(pid)]

                def sockets(pid):
                    links = set()
                    for fd in os.listdir(f"/proc/{pid}/fd"):
                        try:
                            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                        except FileNotFoundError:
                            pass  # (a moment's fd: a peer check's pidfd, closed meanwhile)
                    return {link for link in links if link.startswith("socket:")}
                assert sockets(forker) and not sockets(forker) & sockets(monitor)
            finally:  # the command reads its line and ends; the instance with it
                os.write(in_w, b"go\n")
                assert [reply["event"] for reply in replies] == ["exited"]
    finally:
        for fd in (in_r, in_w, out_r, out_w, cwd):
            os.close(fd)


@pytest.mark.parametrize("victim", ["spare", "forker"])
def test_starts_go_on_when_the_spare_or_the_forker_is_killed(daemon, victim):
    """A killed spare is replaced by the forker; a killed forker by bbld at the next start,
    and its orphaned spare ends (it reads the end of the old forker's channel)."""
    import signal

    run_through(daemon, sandbox(app_layer(command=["true"])))
    with connect(daemon) as conn:
        pid = conn.call("io.bbl.Manager.Ping")["pid"]
    (forker,) = _children(pid)
    _only_a_spare_left(forker)
    (spare,) = _children(forker)
    os.kill(spare if victim == "spare" else forker, signal.SIGKILL)
    # (a spare dies when it next runs: until then, a request that arrives may still be read
    # by it, and lost with it; the start then fails. Wait for the death, as a real start
    # would not race with one the test causes.)
    assert wait_gone([spare if victim == "spare" else forker]) == []
    for _ in range(3):
        events, out, _ = run_through(daemon, sandbox(app_layer(command=sh("echo ran"))))
        assert [e["event"] for e in events] == ["started", "exited"] and out == "ran\n"
    assert wait_gone([spare, forker] if victim == "forker" else [spare]) == []
    (forker_now,) = _children(pid)
    assert (forker_now == forker) == (victim == "spare")
    _only_a_spare_left(forker_now)


def test_the_forker_and_its_monitors_import_no_trio():
    import subprocess
    import sys

    code = "import sys, bbld.monitors.forker; print('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30).stdout == "False\n"


@pytest.mark.parametrize("bad", ["../../escape", "a/../../b", "/etc/passwd", ".", ""])
def test_path_traversal_in_names_and_ids_finds_nothing_and_makes_nothing(daemon, tmp_path, bad):
    """Names and ids never become paths: a start under such a name fails and a call for such
    an id finds no instance; bbld answers the next call and nothing new exists on disk."""
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    events, _, _ = run_through(daemon, {**sandbox(app_layer(command=["true"])), "name": bad})
    assert events[-1]["error"] == "io.bbl.Manager.StartFailed"
    assert events[-1]["exit_code"] == 2
    null = os.open(os.devnull, os.O_RDWR)
    try:
        with connect(daemon) as conn:
            for method, parameters in (("Stop", {}), ("Signal", {"signal": 15}),
                                       ("SendArgs", {"args": []}), ("Exec", {"argv": ["true"]})):
                streamed = method in ("SendArgs", "Exec")  # these take stdio along
                with pytest.raises(RemoteError) as caught:
                    if streamed:
                        list(conn.stream(f"io.bbl.Manager.{method}", fds=(null,) * 3, id=bad,
                                         **parameters))
                    else:
                        conn.call(f"io.bbl.Manager.{method}", id=bad, **parameters)
                assert caught.value.name == "io.bbl.Manager.NoSuchInstance", method
            assert conn.call("io.bbl.Manager.Ping")["pid"] > 0
    finally:
        os.close(null)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
