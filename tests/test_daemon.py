"""bbld: the socket, who may talk to it, Varlink framing and errors, systemd integration."""

import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bbld import protocol
from bbld.daemon import log
from tests.conftest import BBLD, wait_for_socket


def exchange(path, *messages: bytes) -> list[dict]:
    """Send raw messages, return every reply until the daemon closes or stops answering."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        for message in messages:
            sock.sendall(message)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(frame) for frame in data.split(b"\0") if frame]


def call(method, **parameters) -> bytes:
    return json.dumps({"method": method, "parameters": parameters}).encode() + b"\0"


def test_socket_and_directory_are_private(daemon):
    assert stat.S_IMODE(os.stat(daemon).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.parent).st_mode) == 0o700


def test_get_info_and_interface_descriptions(daemon):
    info, iface, manager = exchange(
        daemon, call("org.varlink.service.GetInfo"),
        call("org.varlink.service.GetInterfaceDescription", interface="org.varlink.service"),
        call("org.varlink.service.GetInterfaceDescription", interface="io.bbl.Manager"))
    assert info["parameters"]["interfaces"] == ["org.varlink.service", "io.bbl.Manager"]
    assert iface["parameters"]["description"] == protocol.SERVICE_INTERFACE
    assert manager["parameters"]["description"] == protocol.MANAGER_INTERFACE


def test_the_api_document_holds_the_interface_the_daemon_serves():
    api = open(os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")).read()
    assert protocol.MANAGER_INTERFACE in api


@pytest.mark.parametrize("message, error, parameters", [
    (call("io.bbl.Nope.Ping"), "org.varlink.service.InterfaceNotFound",
     {"interface": "io.bbl.Nope"}),
    (call("io.bbl.Manager.Nope"), "org.varlink.service.MethodNotFound",
     {"method": "io.bbl.Manager.Nope"}),
    (call("io.bbl.Manager.Ping", extra=1), "org.varlink.service.InvalidParameter",
     {"parameter": "extra"}),
    (call("org.varlink.service.GetInterfaceDescription"), "org.varlink.service.InvalidParameter",
     {"parameter": "interface"}),
    (call("org.varlink.service.GetInterfaceDescription", interface=5),
     "org.varlink.service.InvalidParameter", {"parameter": "interface"}),
])
def test_typed_errors_keep_the_connection(daemon, message, error, parameters):
    first, second = exchange(daemon, message, call("io.bbl.Manager.Ping"))
    assert (first["error"], first["parameters"]) == (error, parameters)
    assert second["parameters"]["pid"] > 0  # the same connection goes on


@pytest.mark.parametrize("message, reason", [
    (b"not json\0", "not a varlink call"),
    (b"[1, 2]\0", "not a varlink call"),
    (b'{"method": "Ping"}\0', "is not qualified"),
    (b'{"method": "io.bbl.Manager.Ping", "bogus": 1}\0', "not a varlink call"),
    (b"x" * (protocol.MAX_MESSAGE + 10), "message larger than"),
    (b'{"method": "io.bbl.Manager.Ping", "parameters": {"x": ' + b"[" * 300000 + b"]" * 300000
     + b"}}\0", "maximum recursion depth"),
])
def test_malformed_messages_end_only_that_connection(daemon, message, reason):
    replies = exchange(daemon, message, call("io.bbl.Manager.Ping"))
    assert len(replies) == 1 and replies[0]["error"] == "io.bbl.Manager.InvalidMessage"
    assert reason in replies[0]["parameters"]["reason"]
    assert exchange(daemon, call("io.bbl.Manager.Ping"))[0]["parameters"]["pid"] > 0


def test_truncated_message_gets_no_reply_and_harms_nobody(daemon):
    assert exchange(daemon, call("io.bbl.Manager.Ping")[:-5]) == []
    assert exchange(daemon, call("io.bbl.Manager.Ping"))[0]["parameters"]["pid"] > 0


def test_oneway_calls_get_no_reply(daemon):
    oneway = json.dumps({"method": "io.bbl.Manager.Ping", "oneway": True}).encode() + b"\0"
    replies = exchange(daemon, oneway, call("io.bbl.Manager.Ping"))
    assert len(replies) == 1


def test_reference_varlink_client_interoperates(daemon):
    varlink = pytest.importorskip("varlink")
    with varlink.Client(address=f"unix:{daemon}") as client:
        with client.open("org.varlink.service") as conn:
            assert "io.bbl.Manager" in conn.GetInfo()["interfaces"]
        with client.open("io.bbl.Manager") as conn:
            assert conn.Ping()["version"]
            with pytest.raises(varlink.VarlinkError):
                conn._call("io.bbl.Manager.Nope")


def test_only_one_daemon_serves_a_directory(daemon):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(daemon.parent.parent)}
    second = subprocess.run(BBLD, env=env, capture_output=True, text=True, timeout=20)
    assert second.returncode == 1
    pid = exchange(daemon, call("io.bbl.Manager.Ping"))[0]["parameters"]["pid"]
    assert second.stderr == (f"bbld: another bbld (pid {pid}) already serves {daemon.parent} "
                             f"(socket {daemon}); stop it with `bblctl daemon stop`\n")


def test_unsafe_runtime_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "bbl").mkdir(parents=True)
    os.chmod(run / "bbl", 0o755)
    result = subprocess.run(BBLD, env={**os.environ, "XDG_RUNTIME_DIR": str(run)},
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr == f"bbld: {run}/bbl has mode 0755; run `chmod 700 {run}/bbl`\n"
    assert os.listdir(run / "bbl") == []


def test_socket_activation_and_readiness(tmp_path):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    path = tmp_path / "activated.sock"
    proc = subprocess.Popen([activate, "-l", str(path), *BBLD], stderr=subprocess.PIPE,
                            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "unused")})
    try:
        wait_for_socket(path, proc)
        assert exchange(path, call("io.bbl.Manager.Ping"))[0]["parameters"]["pid"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    assert not (tmp_path / "unused").exists()  # it used the socket it was given


def test_ready_notification(tmp_path):
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(10)
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "NOTIFY_SOCKET": str(notify_path)}
        proc = subprocess.Popen(BBLD, env=env)
        try:
            assert notify.recv(100) == b"READY=1"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


@pytest.mark.root
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run bbld as another user")
def test_another_uid_is_refused(tmp_path):
    """bbld runs as the unprivileged test account; root (which passes the 0600 mode) is told
    PermissionDenied by the peer-credential check, and bbld goes on serving its own user."""
    user = os.environ.get("BBL_TEST_USER", "bbltest")
    base = tempfile.mkdtemp(prefix="bbl-peer-")  # pytest's own tmp is 0700 for root
    os.chmod(base, 0o755)
    run = Path(base) / "run"
    run.mkdir(mode=0o700)
    shutil.chown(run, user)
    proc = subprocess.Popen(["runuser", "-u", user, "--", "env", f"XDG_RUNTIME_DIR={run}",
                             *BBLD], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    path = run / "bbl" / "bbld.sock"
    try:
        wait_for_socket(path, proc)
        (reply,) = exchange(path, call("io.bbl.Manager.Ping"))
        assert (reply["error"], reply["parameters"]) == (
            "io.bbl.Manager.PermissionDenied",
            {"uid": 0, "sandboxed": False,
             "reason": "the caller runs as uid 0, not as bbld's user"})
        ping = call("io.bbl.Manager.Ping")
        code = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(path)!r});"
                f"s.sendall({ping!r}); print(s.recv(4096))")
        as_user = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", code],
                                 capture_output=True, text=True, timeout=20)
        assert '"pid"' in as_user.stdout, as_user.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        shutil.rmtree(base)


def test_setup_installs_links_and_units_that_verify_and_removes_them(tmp_path):
    """`bblctl setup` as a new user would run it, where no user manager runs (this machine):
    links in ~/.local/bin, units rendered with this install's paths that systemd-analyze
    accepts, idempotent; `--remove` takes back exactly that."""
    home = Path(os.environ["HOME"])
    units = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user"
    setup = [sys.executable, "-m", "bblctl", "setup"]
    first = subprocess.run(setup, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1] == ("no systemd user manager runs here: bblctl "
                                             "starts bbld when it is needed")
    for name in ("bblctl", "bbl-bwrap", "bbld"):
        assert os.readlink(home / ".local" / "bin" / name) == f"{sys.prefix}/bin/{name}"
    manuals = [home / ".local" / "share" / path for path in (
        "man/man1/bblctl.1", "man/man1/bbld.1", "man/man1/bbl-bwrap.1",
        "man/man5/bbl-profile.5", "bash-completion/completions/bblctl",
        "fish/vendor_completions.d/bblctl.fish", "zsh/site-functions/_bblctl")]
    assert all(path.is_symlink() and path.exists() for path in manuals)  # (man and bash
    # find them there for a ~/.local/bin on PATH)
    service = (units / "bbld.service").read_text()
    assert f"ExecStart={sys.prefix}/bin/bbld\n" in service and "@" not in service
    assert "\nDelegate=yes\n" in service  # (DelegateSubgroup= only where systemd has it:)
    docs = re.search(r"Documentation=file://(\S+)", (units / "bbld.socket").read_text())[1]
    assert os.path.isfile(docs)
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        result = subprocess.run([analyze, "--user", "verify", str(units / "bbld.socket"),
                                 str(units / "bbld.service")], capture_output=True, text=True,
                                timeout=60)
        assert (result.returncode, result.stderr) == (0, ""), result.stderr
    again = subprocess.run(setup, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "installed" not in again.stdout and \
        "linked" not in again.stdout, again.stdout
    (home / ".local" / "bin" / "mine").write_text("not BBL's")
    removed = subprocess.run([*setup, "--remove"], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert os.listdir(units) == [] and os.listdir(home / ".local" / "bin") == ["mine"]
    assert not any(os.path.lexists(path) for path in manuals)


@pytest.mark.parametrize("systemd, line", [
    (254, "\nDelegateSubgroup=daemon\n"), (252, "\n# (no DelegateSubgroup=: systemd 252)\n")])
def test_the_service_runs_bbld_in_a_leaf_of_its_cgroup_where_systemd_can(systemd, line):
    from bblctl.setup import render

    template = (Path(__file__).parent.parent / "systemd" / "bbld.service").read_text()
    assert line in render(template, "/b", "/d", systemd)


def test_file_descriptors_where_none_are_expected_are_refused_and_closed(daemon):
    read_end, write_end = os.pipe()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(daemon))
        socket.send_fds(sock, [call("io.bbl.Manager.Ping")], [read_end])
        os.close(read_end)
        reply = json.loads(sock.recv(65536).rstrip(b"\0"))
    assert reply["error"] == "io.bbl.Manager.InvalidMessage"
    assert "file descriptor(s) sent with a call that takes none" in reply["parameters"]["reason"]
    with pytest.raises(BrokenPipeError):  # the daemon kept no copy of the read end
        os.write(write_end, b"x")
    os.close(write_end)
    assert exchange(daemon, call("io.bbl.Manager.Ping"))[0]["parameters"]["pid"] > 0


def test_the_log_says_a_flood_in_a_few_lines(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(log, "_budget", log._Budget())
    for n in range(1000):
        log.say(f"cannot accept a connection \x1b[2J{n}")
    monkeypatch.setattr(log._budget, "start", log._budget.start - log.WINDOW)
    log.say("later")
    lines = out.getvalue().splitlines()
    assert len(lines) == log.BURST + 2
    assert lines[-2] == f"bbld: ({1000 - log.BURST} more log lines were left out)"
    assert lines[-1] == "bbld: later"
    assert "\x1b" not in out.getvalue() and "\\x1b[2J" in lines[0]


def test_explicit_nulls_are_accepted_where_the_interface_says_maybe(daemon):
    """Varlink clients send null for a `?type` parameter they leave unset."""
    listed, signalled = exchange(
        daemon, json.dumps({"method": "io.bbl.Manager.List",
                            "parameters": {"all": None, "brief": None}}).encode() + b"\0",
        json.dumps({"method": "io.bbl.Manager.Signal",
                    "parameters": {"id": "nope", "signal": 15, "pid": None}}).encode() + b"\0")
    assert listed["parameters"] == {"instances": []}
    assert signalled["error"] == "io.bbl.Manager.NoSuchInstance"
    (required,) = exchange(daemon, json.dumps({"method": "io.bbl.Manager.Signal", "parameters": {
        "id": None, "signal": 15}}).encode() + b"\0")
    assert (required["error"], required["parameters"]) == (
        "org.varlink.service.InvalidParameter", {"parameter": "id"})
    varlink = pytest.importorskip("varlink")
    with varlink.Client(address=f"unix:{daemon}") as client, \
            client.open("io.bbl.Manager") as conn:
        assert conn.List(None, None) == {"instances": []}


def test_each_methods_parameters_are_the_interfaces():
    """The Structs bbld checks calls with say what the published interface says: the same
    names, `?type` exactly where a default of null is."""
    from bbld.daemon.methods import Daemon

    declared = {}
    for name, params in re.findall(r"^method (\w+)\(([^)]*)\)", protocol.MANAGER_INTERFACE,
                                   re.M):
        fields = [p.strip() for p in params.replace("\n", " ").split(",") if p.strip()]
        declared[name] = {field.split(":")[0].strip(): field.split(":")[1].strip()
                          .startswith("?") for field in fields}
    methods = Daemon().methods
    for name, optional in declared.items():
        struct = methods[f"io.bbl.Manager.{name}"][1]
        defaults = dict(zip(struct.__struct_fields__[len(struct.__struct_fields__)
                                                     - len(struct.__struct_defaults__):],
                            struct.__struct_defaults__, strict=True))
        assert set(struct.__struct_fields__) == set(optional), name
        assert {f for f in struct.__struct_fields__ if defaults.get(f, ...) is None} == \
            {f for f, maybe in optional.items() if maybe}, name
