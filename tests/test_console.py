"""The app's own terminal, which its monitor holds (bbld.monitors.console): detach with a key,
reattach, output kept while nobody looks (bounded), one client at a time, resize and exit
status, all through real ptys as a user's terminal would (tests.conftest.Session)."""

import json
import os
import subprocess
import termios

import pytest

from tests.conftest import BBLCTL, Session, app_layer, sandbox, sh, wait_until

DETACH = "\x1d"  # Ctrl-]


def start_detached(instances, *argv) -> str:
    result = instances.ctl("start", "default", "--detach", *argv)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()  # (the fixture stops every instance at the end)


def running(instances) -> list[str]:
    return [e["id"] for e in json.loads(instances.ctl("ps", "--json").stdout)]


def exists_inside(instances, instance: str, path: str) -> bool:
    return instances.ctl("exec", instance, "--", "test", "-e", path).returncode == 0


def test_detach_reattach_keeps_the_app_and_what_it_wrote_meanwhile(instances):
    session = Session(["start", "default"], instances.env)
    try:
        session.expect("$ ")
        session.send("mkfifo /tmp/go && echo made$((1+1))\r")
        session.expect("made2")
        session.send("read x </tmp/go; echo away-$x$((3*3)); : >/tmp/done\r")
        session.send(DETACH)  # the shell waits on the fifo: it runs on, detached
        assert session.proc.wait(timeout=30) == 0
        (instance,) = running(instances)
        assert f"bblctl: detached from {instance}; `bblctl attach {instance}`" in \
            session.expect("again")
        assert termios.tcgetattr(session.slave) == session.modes  # raw mode undone
    finally:
        session.close()
    wake = instances.ctl("exec", instance, "--", "sh", "-c", "echo now >/tmp/go")
    assert wake.returncode == 0, wake.stderr
    assert wait_until(lambda: exists_inside(instances, instance, "/tmp/done"))
    # The app wrote while nobody was attached: the next client sees it first.
    again = Session(["attach", instance[:6]], instances.env)
    try:
        again.expect("away-now9")
        again.resize(50, 132)
        assert wait_until(lambda: again.send("stty size\r") or "50 132" in again.expect("$ "))
        again.send("exit 5\r")
        assert again.proc.wait(timeout=30) == 5  # the app's status
    finally:
        again.close()
    assert wait_until(lambda: running(instances) == [])


def test_one_client_at_a_time_a_new_one_takes_over(instances):
    instance = start_detached(instances)
    first = Session(["attach", instance], instances.env)
    try:
        first.expect("$ ")
        first.send("echo one$((0+1))\r")
        first.expect("one1")
        second = Session(["attach", instance], instances.env)
        try:
            second.expect("one1")  # the scrollback: what the first client saw
            assert first.proc.wait(timeout=30) == 0
            assert "(the terminal was attached elsewhere)" in first.expect("again")
            second.send("echo two$((1+1))\r")
            second.expect("two2")
            second.proc.kill()  # a client that dies is only detached
            second.proc.wait(timeout=30)
        finally:
            second.close()
    finally:
        first.close()
    assert running(instances) == [instance]
    third = Session(["attach", instance], instances.env)
    try:
        third.expect("two2")
        third.send("exit 7\r")
        assert third.proc.wait(timeout=30) == 7
    finally:
        third.close()


def test_the_scrollback_is_bounded_and_starts_at_a_line(instances):
    instance = start_detached(instances, "--", "sh", "-c",
                              "seq 200000; : >/tmp/done; exec sleep 600")
    assert wait_until(lambda: exists_inside(instances, instance, "/tmp/done"), timeout=30)
    session = Session(["attach", instance], instances.env)
    try:
        shown = session.expect("200000\r\n")
        session.send(DETACH)
        assert session.proc.wait(timeout=30) == 0
    finally:
        session.close()
    replay = shown[:shown.index("200000\r\n")]
    assert 60_000 < len(replay) <= 64 * 1024  # (the last 64 KiB, from its first whole line)
    first = replay.split("\r\n")[0]
    assert first.isdigit() and int(first) > 190000
    assert int(first) + 1 == int(replay.split("\r\n")[1])


def test_a_long_paste_reaches_the_app_whole(instances):
    """More input than the terminal takes at once waits in the monitor until the app reads
    it (also while the app's output waits for the client)."""
    session = Session(["start", "default", "--", "sh", "-c",
                       "stty raw -echo; echo ready; head -c 200000 | wc -c"], instances.env)
    try:
        session.expect("ready")
        session.send("x" * 200000)
        assert "200000" in session.expect("200000", timeout=30)
        assert session.proc.wait(timeout=30) == 0
    finally:
        session.close()


def test_stop_hangs_up_the_apps_terminal_so_an_interactive_shell_ends_at_once(instances):
    """bash -i ignores SIGTERM; the hangup that comes with it ends it (no waiting for the
    timeout and SIGKILL). The attached client sees its end and the app's status."""
    instance = start_detached(instances)
    session = Session(["attach", instance], instances.env)
    try:
        session.expect("$ ")
        result = instances.ctl("stop", instance, "--timeout", "60")
        assert (result.returncode, result.stderr.splitlines()[-1]) == (
            0, f"bblctl: {instance}: terminated (status 129)"), result.stderr
        assert session.proc.wait(timeout=30) == 129
    finally:
        session.close()


def monitor_rss_kb(instances, instance: str) -> int:
    """The instance's monitor (layer 1's parent): its resident memory."""
    (tree,) = json.loads(instances.ctl("tree", instance, "--json").stdout)
    with open(f"/proc/{tree['layers'][0]['pid']}/status") as status:
        monitor = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    with open(f"/proc/{monitor}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_an_app_flooding_its_terminal_while_detached_does_not_grow_its_monitor(instances):
    """From inside, 40 MB written to the app's terminal with nobody attached: the monitor
    keeps 64 KiB of it, and its memory stays within a few MB of an idle instance's."""
    idle = start_detached(instances, "--", "sleep", "600")
    flood = start_detached(instances, "--", "sh", "-c", "head -c 40000000 /dev/zero | "
                           "tr '\\0' x; : >/tmp/done; exec sleep 600")
    assert wait_until(lambda: exists_inside(instances, flood, "/tmp/done"), timeout=120)
    grown = monitor_rss_kb(instances, flood) - monitor_rss_kb(instances, idle)
    assert grown < 4096, f"the flooded monitor holds {grown} KB more than an idle one"


def test_the_detach_key_can_be_changed_and_otherwise_reaches_the_app(instances):
    bad = instances.ctl("start", "default", "--detach-key", "ctrl-1")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("bblctl start: detach key 'ctrl-1': give ctrl-X")
    session = Session(["start", "default", "--detach-key", "ctrl-a"], instances.env)
    try:
        session.expect("$ ")
        session.send("cat -v\r")
        session.send(DETACH + "\r")  # not ours now: the app gets it
        session.expect("^]")
        session.send("\x04")
        session.expect("$ ")
        session.send("\x01")  # Ctrl-A
        assert session.proc.wait(timeout=30) == 0
    finally:
        session.close()
    assert len(running(instances)) == 1  # (detached: it runs on)


def test_attach_opens_a_new_shell_where_the_app_has_no_terminal_or_when_asked(instances):
    quiet = instances.start(sandbox(app_layer(command=sh("sleep 600"))))
    session = Session(["attach", quiet], instances.env)
    try:
        assert "bblctl: notice: the app has no terminal of its own (it was not started on " \
            "one): a new terminal in its layer instead" in session.expect("# ")
        # (no terminal of its own: a shell in its layer, as root)
        session.send("exit 3\r")
        assert session.proc.wait(timeout=30) == 3
    finally:
        session.close()
    instance = start_detached(instances)
    session = Session(["attach", "--new", instance], instances.env)
    try:
        session.expect("$ ")
        session.send("tty\r")
        session.expect("/dev/pts/1")  # not the app's /dev/pts/0
        session.send("exit 4\r")
        assert session.proc.wait(timeout=30) == 4
    finally:
        session.close()
    assert instance in running(instances)


def test_the_attach_call_says_noterminal_for_an_app_without_one(instances):
    import socket

    quiet = instances.start(sandbox(app_layer(command=sh("sleep 600"))))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl", "bbld.sock"))
        sock.sendall(json.dumps({"method": "io.bbl.Manager.Attach", "parameters": {"id": quiet},
                                 "more": True}).encode() + b"\0")
        data = b""
        while not data.endswith(b"\0") and (chunk := sock.recv(65536)):
            data += chunk
    reply = json.loads(data[:-1])
    assert reply["error"] == "io.bbl.Manager.NoTerminal"
    assert reply["parameters"] == {"id": quiet, "message": "the app has no terminal of its own "
                                                           "(it was not started on one)"}


def test_a_bubblewrap_command_line_has_no_detach_key(bbl_env):
    from tests.test_run_cli import SYSTEM

    session = Session(["run", *SYSTEM, "sh", "-c", "head -c 2 | od -An -c"], bbl_env)
    try:
        session.send(DETACH + "x\r")  # (a line: the terminal is in canonical mode)
        assert "035   x" in session.expect("035   x", timeout=30)
        assert session.proc.wait(timeout=30) == 0
    finally:
        session.close()
        for entry in json.loads(subprocess.run([*BBLCTL, "ps", "--json"], env=bbl_env,
                                               capture_output=True, timeout=30).stdout):
            subprocess.run([*BBLCTL, "kill", entry["id"]], env=bbl_env, timeout=30)


@pytest.mark.parametrize("name, key", [("ctrl-]", b"\x1d"), ("^A", b"\x01"), ("Ctrl-Z", b"\x1a"),
                                       ("ctrl-@", b"\x00"), ("none", None)])
def test_detach_key_names(name, key):
    from bblctl.terminal import detach_key

    assert detach_key(name) == key


@pytest.mark.parametrize("name", ["ctrl-1", "x", "ctrl-", "^ab", "alt-x"])
def test_bad_detach_key_names(name):
    from bblctl.terminal import detach_key

    with pytest.raises(ValueError, match="give ctrl-X"):
        detach_key(name)


def test_the_default_detach_key_comes_from_the_environment(monkeypatch):
    from bblctl.terminal import detach_key

    monkeypatch.setenv("BBL_DETACH_KEY", "ctrl-b")
    assert detach_key(None) == b"\x02"
    monkeypatch.delenv("BBL_DETACH_KEY")
    assert detach_key(None) == b"\x1d"
    assert os.environ.get("BBL_DETACH_KEY") is None
