"""A sandbox that sees bbld's socket must not get an unsandboxed instance through it: bbld and
every instance's control socket serve only peers in the daemon's own user and mount namespaces
(bbld.peer), and a bubblewrap command line run inside a sandbox nests in it, as bubblewrap
inside bubblewrap does (bbld.engine.standalone)."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from bbld import peer
from tests.conftest import TIMEOUT, processes_with, read_line, wait_gone

BBL_BWRAP = [sys.executable, "-m", "bblctl.run"]
BBLCTL = [sys.executable, "-m", "bblctl"]
ENOSPC = ("bwrap: Creating new namespace failed: nesting depth or "
          "/proc/sys/user/max_*_namespaces exceeded (ENOSPC)\n")
SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Raw Varlink and control requests, as a program inside a sandbox would send them (standard
# library only): bbld's Ping, Run and Exec, and each instance's status and exec (with stdio).
KNOCK = r"""
import json, os, socket, sys

def ask(path, kind, message, fds=()):
    with socket.socket(socket.AF_UNIX, kind) as s:
        s.settimeout(10)
        try:
            s.connect(path)
            socket.send_fds(s, [message], list(fds)) if fds else s.sendall(message)
            data = s.recv(65536)
            while kind == socket.SOCK_STREAM and data and not data.endswith(b"\0"):
                more = s.recv(65536)
                if not more:
                    break
                data += more
            return data.rstrip(b"\0").decode()
        except OSError as error:
            return f"OSError: {error}"

runtime = sys.argv[1]
calls = {"Ping": {}, "Run": {"bwrap": ["--ro-bind", "/", "/", "true"], "args": [], "env": {}},
         "Exec": {"id": sys.argv[2], "argv": ["true"]}}
answers = {}
for method, parameters in calls.items():
    call = {"method": "io.bbl.Manager." + method, "parameters": parameters,
            "more": method != "Ping"}
    answers[method] = ask(os.path.join(runtime, "bbld.sock"), socket.SOCK_STREAM,
                          json.dumps(call).encode() + b"\0", (0, 1, 2) if method == "Run" else ())
for name in sorted(os.listdir(os.path.join(runtime, "instances"))):
    if name.endswith(".sock"):
        path = os.path.join(runtime, "instances", name)
        answers[name + " status"] = ask(path, socket.SOCK_SEQPACKET, b'{"op": "status"}')
        answers[name + " exec"] = ask(path, socket.SOCK_SEQPACKET,
                                      b'{"op": "exec", "argv": ["true"]}', (0, 1, 2))
print(json.dumps(answers))
"""


@pytest.fixture
def env(bbl_env, tmp_path):
    """A private daemon (running) and a home of our own with a secret in it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("hunter2\n")
    environment = {**bbl_env, "HOME": str(home)}
    assert bwrap(environment, "--ro-bind", "/", "/", "true").returncode == 0  # bbld runs now
    return environment


def bwrap(env, *argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*BBL_BWRAP, *argv], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)


def ctl(env, *argv) -> subprocess.CompletedProcess:
    return subprocess.run([*BBLCTL, *argv], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def instances_started(env) -> int:
    return len(json.loads(ctl(env, "ps", "--all", "--json").stdout))


def runtime(env) -> str:
    return os.path.join(env["XDG_RUNTIME_DIR"], "bbl")


HOST_NET = os.readlink("/proc/self/ns/net")
REPORT = 'readlink /proc/self/ns/net; cat "$HOME/secret.txt" 2>&1; true'


@pytest.mark.parametrize("outer", [
    ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--unshare-all"],
    ["--dev-bind", "/", "/", "--unshare-user", "--unshare-net"],
], ids=["ro-bind", "dev-bind"])
def test_a_nested_bbl_bwrap_sees_only_what_its_sandbox_allows(env, outer):
    """The home is hidden and the network cut off outside; inside, a bbl-bwrap that asks for
    the whole root gets the outer sandbox's root, not the host's (bbld refuses it, so it
    runs in the sandbox's own namespaces)."""
    before = instances_started(env)
    inner = " ".join([*BBL_BWRAP, "--dev-bind", "/", "/", "--", "sh", "-c", f"'{REPORT}'"])
    result = bwrap(env, *outer, "--tmpfs", env["HOME"], "--", "sh", "-c",
                   f"{REPORT}; {inner}; echo status $?")
    outer_net, missing, inner_net, inner_missing, status = result.stdout.splitlines()
    assert status == "status 0", result.stderr
    assert outer_net == inner_net != HOST_NET
    assert "hunter2" not in missing + inner_missing
    assert instances_started(env) == before + 1  # the outer one only


def test_a_nested_bbl_bwrap_cannot_write_where_its_sandbox_is_read_only(env):
    target = os.path.join(env["HOME"], "written-from-nested")
    result = bwrap(env, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
                   "--unshare-all", "--", *BBL_BWRAP, "--bind", "/", "/", "--proc", "/proc",
                   "--", "touch", target)
    assert result.returncode == 1 and "Read-only file system" in result.stderr
    assert not os.path.exists(target)


def test_a_nested_die_with_parent_ends_with_its_callers_parent(env, tmp_path, marker):
    """Nested, the engine runs in the client: when the client's parent dies, the client and
    its sandbox die, while the outer sandbox goes on."""
    script = tmp_path / "parent.sh"
    script.write_text('sh -c \'"$@"; echo never\' sh "$@" &\necho "parent $!"\nwait\n'
                      'read -r line; exit 0\n')  # (the outer sandbox lives on until told to end)
    outer = subprocess.Popen(
        [*BBL_BWRAP, "--dev-bind", "/", "/", "--unshare-user", "--", "sh", str(script),
         *BBL_BWRAP, "--dev-bind", "/", "/", "--die-with-parent", "sh", "-c",
         'echo "sleeper $$"; exec sleep 1000', marker],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lines = dict(read_line(outer.stdout).split() for _ in range(2))
        parent, sleeper = int(lines["parent"]), int(lines["sleeper"])
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            client = int(f.read().split()[0])
        os.kill(parent, signal.SIGKILL)
        assert wait_gone([client, sleeper]) == []
        outer.stdin.close()
        assert outer.wait(timeout=TIMEOUT) == 0
    finally:
        outer.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_disable_userns_holds_for_a_nested_bbl_bwrap_as_for_bubblewrap(env):
    outer = ["--unshare-user", "--disable-userns", "--dev-bind", "/", "/", "--"]
    inner = ["--unshare-user", "--dev-bind", "/", "/", "--", "true"]
    result = bwrap(env, *outer, *BBL_BWRAP, *inner)
    assert (result.returncode, result.stderr) == (1, ENOSPC)
    if shutil.which("bwrap"):  # Debian's bubblewrap says the same
        real = subprocess.run(["bwrap", *outer, "bwrap", *inner], capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert (real.returncode, real.stderr) == (1, ENOSPC)


def test_raw_calls_from_inside_are_refused_by_bbld_and_every_instance(env, tmp_path):
    """From a --ro-bind / / sandbox: bbld's Ping, Run and Exec, and each instance's status
    and exec (its own instance's and another's) get a refusal and nothing else."""
    other = ctl(env, "start", _profile(tmp_path, 'command = ["sleep", "600"]'), "--detach")
    assert other.returncode == 0, other.stderr
    try:
        before = instances_started(env)
        result = bwrap(env, "--ro-bind", "/", "/", "--unshare-all", "--", sys.executable,
                       "-c", KNOCK, runtime(env), other.stdout.strip())
        answers = json.loads(result.stdout or result.stderr)
        assert len(answers) == 3 + 2 * 2, answers  # both instances' sockets were seen
        for name, answer in answers.items():
            reply = json.loads(answer)
            if name in ("Ping", "Run", "Exec"):
                assert reply["error"] == "io.bbl.Manager.PermissionDenied", (name, reply)
                assert reply["parameters"]["sandboxed"] is True
                assert "another user namespace" in reply["parameters"]["reason"]
            else:
                assert reply["op"] == "error" and "permission denied" in reply["message"]
        assert instances_started(env) == before + 1  # the sandbox that knocked
    finally:
        ctl(env, "stop", other.stdout.strip(), "--timeout", "0")


def test_a_profile_that_binds_the_runtime_directory_gets_no_way_out(env, tmp_path):
    """The template's app layer with bbld's runtime directory (and BBL itself) bound in:
    raw calls are refused, and a nested bbl-bwrap cannot reach the host's home."""
    binds = [runtime(env), sys.prefix, SOURCE]
    script = (f"{sys.executable} -c {_quote(KNOCK)} {runtime(env)} none; "
              f"{' '.join(BBL_BWRAP)} --ro-bind / / cat {env['HOME']}/secret.txt; echo $?")
    profile = _profile(tmp_path, f"command = {json.dumps(['sh', '-c', script])}\n"
                       f"mounts = {_toml_mounts(binds)}")
    before = instances_started(env)
    result = ctl(env, "start", profile)
    answers, *rest = result.stdout.splitlines()
    for name, answer in json.loads(answers).items():
        assert "PermissionDenied" in answer or "permission denied" in answer, (name, answer)
    assert "hunter2" not in result.stdout
    assert rest[-1] != "0"  # the app layer may not make namespaces: nothing ran at all
    assert instances_started(env) == before + 1


def test_a_client_inside_a_sandbox_starts_no_daemon(env, tmp_path):
    """No bbld in reach from inside (its runtime directory hidden): bblctl says so in one
    line and starts none there (it would run inside the sandbox and could outlive it), and
    bbl-bwrap nests."""
    inside_state = tmp_path / "inside-state"
    inside_state.mkdir()
    hidden = {**env, "XDG_STATE_HOME": str(inside_state)}
    result = subprocess.run(
        [*BBL_BWRAP, "--dev-bind", "/", "/", "--unshare-user", "--tmpfs", runtime(env), "--",
         "sh", "-c", f"{' '.join(BBLCTL)} ps; echo status $?; "
                     f"{' '.join(BBL_BWRAP)} --dev-bind / / echo nested"],
        env=hidden, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.stdout == "status 1\nnested\n", result.stderr
    assert result.stderr == ("bblctl: bbld does not serve inside a sandbox and is not started "
                             "from one; run bblctl outside it\n")
    assert os.listdir(inside_state) == []  # no autostart lock, no log


def test_other_commands_inside_a_sandbox_fail_with_one_line(env):
    result = bwrap(env, "--ro-bind", "/", "/", "--unshare-user", "--", *BBLCTL, "ps")
    assert result.returncode == 1
    assert result.stderr == "bblctl: bbld does not serve inside a sandbox; run bblctl outside it\n"
    single = bwrap(env, "--ro-bind", "/", "/", "--unshare-user", "--", *BBLCTL, "run",
                   "--name", "x", "--single-instance", "true")
    assert single.returncode == 2 and single.stderr.count("\n") == 1, single.stderr


def test_the_probe_finds_a_daemon_that_serves(env, tmp_path):
    """The probe's daemon check sees an open socket when one serves (from the host here), so
    its "blocked" inside means refused."""
    spec = importlib.util.spec_from_file_location(
        "probe", os.path.join(os.path.dirname(__file__), "probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    started = ctl(env, "start", _profile(tmp_path, 'command = ["sleep", "600"]'), "--detach")
    try:
        instance_sockets = [os.path.join(runtime(env), "instances", name) for name in
                            os.listdir(os.path.join(runtime(env), "instances"))
                            if name.endswith(".sock")]
        assert instance_sockets
        assert probe._is_bbld(os.path.join(runtime(env), "bbld.sock"))
        assert all(probe._is_bbld(path) for path in instance_sockets)
    finally:
        ctl(env, "stop", started.stdout.strip(), "--timeout", "0")


# ---------------------------------------------------------------- the peer check itself


def _listener(tmp_path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "listen.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(TIMEOUT)
    return listener, path


def _connect_from(command: list[str], path: str) -> subprocess.Popen:
    """A process (after `command`, e.g. `unshare --user`) that connects to `path` and waits
    until its stdin closes."""
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "sys.stdin.read()")
    return subprocess.Popen([*command, sys.executable, "-c", code, path],
                            stdin=subprocess.PIPE)


def _each_way(conn: socket.socket) -> list[peer.Identity]:
    """The peer's namespaces as each kernel generation lets us see them."""
    pid = peer._peer_credentials(conn)[0]
    pidfd = conn.getsockopt(socket.SOL_SOCKET, peer.SO_PEERPIDFD)
    try:
        return [peer.namespaces_of_pidfd(pidfd), peer._namespaces_through_proc(pidfd, pid),
                peer._namespaces_by_pid(conn, pid)]
    finally:
        os.close(pidfd)


def test_the_peer_check_passes_our_session_and_refuses_a_user_namespace(tmp_path):
    listener, path = _listener(tmp_path)
    own = peer.own_namespaces()
    for command, sandboxed in (([], False), (["unshare", "--user"], True)):
        client = _connect_from(command, path)
        try:
            conn, _ = listener.accept()
            with conn:
                found = _each_way(conn)
                assert found[0] == found[1] == found[2]
                if not sandboxed:
                    assert found[0] == own
                    peer.check(conn, own)
                    continue
                assert found[0]["user"] != own["user"]
                with pytest.raises(peer.Refused) as refused:
                    peer.check(conn, own)
                assert refused.value.sandboxed and refused.value.uid == os.getuid()
        finally:
            client.stdin.close()
            client.wait(timeout=TIMEOUT)
    listener.close()


def test_a_connection_whose_maker_has_gone_is_refused(tmp_path):
    """Its pid may already belong to someone else: neither way may take that one's word."""
    listener, path = _listener(tmp_path)
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            made = socket.socket(socket.AF_UNIX)
            made.connect(path)
            socket.send_fds(theirs, [b"x"], [made.fileno()])
        finally:
            os._exit(0)
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    os.waitpid(pid, 0)
    conn, _ = listener.accept()
    try:
        with pytest.raises(peer.Refused) as refused:
            peer.check(conn, peer.own_namespaces())
        assert not refused.value.sandboxed
        with pytest.raises(OSError):
            peer._namespaces_by_pid(conn, pid)
    finally:
        for item in (conn, listener, ours, theirs):
            item.close()
        os.close(fds[0])


@pytest.mark.root
@pytest.mark.skipif(os.getuid() != 0, reason="a mount namespace of our user namespace takes root")
def test_root_in_another_mount_namespace_is_refused(tmp_path):
    """A rootful container or a root bubblewrap has no user namespace of its own but its
    own mount namespace: still a sandbox."""
    listener, path = _listener(tmp_path)
    client = _connect_from(["unshare", "--mount"], path)
    try:
        conn, _ = listener.accept()
        with conn, pytest.raises(peer.Refused) as refused:
            peer.check(conn, peer.own_namespaces())
        assert refused.value.sandboxed and "mount namespace" in refused.value.reason
    finally:
        client.stdin.close()
        client.wait(timeout=TIMEOUT)
        listener.close()


def _profile(tmp_path, text: str) -> str:
    path = tmp_path / f"p{len(os.listdir(tmp_path))}.toml"
    path.write_text(text + "\n")
    return str(path)


def _toml_mounts(paths: list[str]) -> str:
    return "[" + ", ".join(f'{{ src = "{path}" }}' for path in paths) + "]"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
