"""bblctl's connection: autostart of one daemon for many simultaneous clients; no trio."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import daemon_pid

PING = ("import sys; from bblctl.client import connect; c = connect();"
        "print(c.call('io.bbl.Manager.Ping')['pid']); print('trio' in sys.modules)")


def test_ten_clients_at_once_start_exactly_one_daemon(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "XDG_STATE_HOME": str(tmp_path / "state")}
    clients = [subprocess.Popen([sys.executable, "-c", PING], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(10)]
    outputs = [client.communicate(timeout=60) for client in clients]
    pids = set()
    try:
        for (out, err), client in zip(outputs, clients, strict=True):
            assert client.returncode == 0, err
            pid, trio_loaded = out.split()
            pids.add(int(pid))
            assert trio_loaded == "False"  # the client never imports trio
        assert len(pids) == 1
        (daemon,) = pids
        assert (tmp_path / "state" / "bbl" / "bbld.log").exists()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{daemon}")
    assert not (run / "bbl" / "bbld.sock").exists()


def test_an_autostarted_daemon_tells_its_client_when_it_is_ready_and_no_one_else(tmp_path):
    """The client waits for bbld's READY=1 on a socket of its own (NOTIFY_SOCKET), not by
    polling; bbld drops the variable, so its forker (and what that starts) cannot notify."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("NOTIFY_SOCKET", None)
    result = subprocess.run([sys.executable, "-m", "bblctl", "run", "--ro-bind", "/", "/",
                             "true"], env=env, capture_output=True, text=True, timeout=60)
    daemon = daemon_pid(env)
    try:
        assert result.returncode == 0, result.stderr
        with open(f"/proc/{daemon}/task/{daemon}/children") as f:
            (forker,) = [int(pid) for pid in f.read().split()]
        with open(f"/proc/{forker}/environ", "rb") as f:  # (bbld's own shows its start's)
            assert b"NOTIFY_SOCKET=" not in f.read()
    finally:
        os.kill(daemon, signal.SIGTERM)


def test_a_daemon_that_cannot_start_is_reported_at_once(tmp_path):
    run = tmp_path / "run"
    (run / "bbl").mkdir(parents=True, mode=0o755)  # bbld refuses a runtime dir others can read
    run.chmod(0o700)
    (run / "bbl").chmod(0o755)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "XDG_STATE_HOME": str(tmp_path / "state")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "bblctl", "ps"], env=env,
                            capture_output=True, text=True, timeout=60)
    log = tmp_path / "state" / "bbl" / "bbld.log"
    assert (result.returncode, result.stderr) == (1, f"bblctl: bbld did not start; see {log}\n")
    assert time.monotonic() - started < 5  # its end was noticed, not the 10 s timeout
    assert "has mode 0755" in log.read_text()


def test_without_autostart_a_missing_daemon_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    code = ("from bblctl.client import connect, ClientError\ntry:\n connect(autostart=False)\n"
            "except ClientError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "XDG_RUNTIME_DIR": str(run)}, timeout=30).stdout
    assert out == f"no bbld listens on {run}/bbl/bbld.sock; start it with `bbld`\n"


def modules_imported_by(*modules: str) -> set[str]:
    """The modules a fresh interpreter loads to import `modules`."""
    code = (f"import sys; before = set(sys.modules); import {', '.join(modules)}; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return set(out.split())


def test_the_client_imports_neither_trio_nor_the_engine():
    loaded = modules_imported_by("bblctl.__main__", "bblctl.run", "bblctl.client",
                                 "bblctl.manage", "bblctl.enter", "bblctl.profiles",
                                 "bblctl.desktop", "bblctl.cli", "bblctl.terminal")
    assert sorted(m for m in loaded if m == "trio" or m.startswith(("bbld.engine",
                                                                     "bbld.daemon"))) == []


def test_everyday_commands_import_only_the_wire():
    """run, start, exec, attach, send-args, ps, tree, stop and kill pay for no heavy import:
    msgspec, the spec, json, re, socket.py, signal.py and enum cost about 50 ms together."""
    loaded = modules_imported_by("bblctl.__main__", "bblctl.run", "bblctl.client",
                                 "bblctl.manage", "bblctl.enter", "bblctl.cli", "bblctl.profiles")
    heavy = {"msgspec", "bbld.spec", "bbld.bwrap", "json", "re", "socket", "signal", "enum",
             "datetime", "typing"}
    assert sorted(heavy & loaded) == []


def test_exec_and_send_args_load_no_terminal_code():
    """Only attach, and start on a terminal, need termios and tty (1 ms); the commands'
    modules are found without importlib (which imports warnings: 0.8 ms)."""
    code = ("import sys; before = set(sys.modules); from bblctl.__main__ import main; "
            "main(['exec', '--bogus']); main(['send-args']); main(['ps', '--bogus']); "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=30, check=True).stdout.split())
    assert {"bblctl.enter", "bblctl.manage"} <= loaded
    assert sorted({"termios", "tty", "importlib", "warnings"} & loaded) == []


@pytest.mark.parametrize("entry, argv, status", [
    ("bblctl.__main__:entry", ["bblctl", "--help"], 0),
    ("bblctl.__main__:entry", ["bblctl", "frobnicate"], 2),
    ("bblctl.__main__:entry", ["bblctl", "profile", "show", "no-such-profile"], 2)])
def test_the_installed_scripts_exit_without_finalization_but_with_their_output(entry, argv,
                                                                              status):
    """The entry points end with os._exit (bblctl.cli.exit_now): output written to a pipe
    (block-buffered) must still arrive, and the status must be the command's."""
    module, function = entry.split(":")
    code = (f"import sys; sys.argv = {argv!r}; import atexit; atexit.register(print, 'late')\n"
            f"from {module} import {function}; {function}()")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=buffered, timeout=30)
    assert result.returncode == status, result.stderr
    assert (result.stdout + result.stderr).strip() and "late" not in result.stdout
    if status == 0:
        assert result.stdout.startswith("usage: bblctl COMMAND")


@pytest.mark.parametrize("buffering", ["unbuffered", "block-buffered"])
def test_output_to_a_reader_that_went_away_ends_the_client_quietly(buffering):
    """`bblctl ps | head -1`: no traceback, the status of a program killed by SIGPIPE."""
    code = ("import sys; sys.argv = ['bblctl', '--help']\n"
            "from bblctl.__main__ import entry; entry()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if buffering == "unbuffered":
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)  # every write fails with EPIPE
    try:
        result = subprocess.run([sys.executable, "-c", code], stdout=write,
                                stderr=subprocess.PIPE, text=True, env=env, timeout=30)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


def test_the_client_wire_speaks_json_like_the_json_module():
    import json

    from bblctl import wire

    value = {"a": [1, -2.5, None, True, False, "é\n\0\"\\", {"b": []}], "": {}}
    assert json.loads(wire.dumps(value)) == value
    assert wire.loads(json.dumps(value)) == value
    for bad in ("", "{", '{"a": 1} x', "[1,]"):
        try:
            wire.loads(bad)
        except wire.ProtocolError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


def test_bblctl_run_checks_names_as_the_spec_does():
    from bblctl.cli import is_name
    from bbld.spec import NAME_PATTERN

    for name in ("a", "A0", "0a", "a.b_c-d", "a" * 64, "a" * 65, "", ".a", "-a", "_a", "a b",
                 "a/b", "a\n", "é", "a\0", "ab:c"):
        assert is_name(name) == bool(NAME_PATTERN.fullmatch(name)), name


def test_a_refusal_as_a_sandbox_is_told_apart_from_other_errors():
    """bbld's PermissionDenied with sandboxed: true is what makes bbl-bwrap nest (should the
    client's own look at bbld have passed); other refusals stay errors."""
    import socket

    from bblctl.client import Connection, RemoteError, Sandboxed

    for sandboxed, expected in ((True, Sandboxed), (False, RemoteError)):
        ours, theirs = socket.socketpair()
        theirs.sendall(('{"error": "io.bbl.Manager.PermissionDenied", "parameters": {"uid": 1, '
                        f'"sandboxed": {str(sandboxed).lower()}, "reason": "r"}}}}\0').encode())
        with Connection(ours) as conn, pytest.raises(expected) as raised:
            conn.call("io.bbl.Manager.Ping")
        assert type(raised.value) is expected
        theirs.close()
