"""The probe (tests/security/probe.py) tries to get out of sandboxes: the default template's
app layer, a strict bubblewrap-style run, and a deliberately weak run that proves the probe
can tell when something is open."""

import json
import os
import socket

import pytest

PROBE = open(os.path.join(os.path.dirname(__file__), "probe.py")).read()
SECCOMP = ["ioctl TIOCSTI", "ioctl TIOCLINUX", "ioctl TIOCSTI (high bits)", "keyctl",
           "add_key", "request_key", "perf_event_open", "bpf", "userfaultfd", "setns",
           "process_vm_readv", "name_to_handle_at", "fsopen", "open_tree", "move_mount",
           "mount_setattr", "clone3", "personality", "unshare(CLONE_NEWUSER)",
           "ptrace(TRACEME)", "i386 ABI", "x32 ABI"]
ISOLATION = ["host canary", "daemon socket", "host TCP listener", "leaked fds", "capabilities",
             "no_new_privs", "write /usr", "/proc/1/root", "host abstract socket",
             "host SysV shm", "host process visible", "signal the supervisor", "write uid_map",
             "setgroups", "setuid(0)"]
SYSTEM = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib",
          "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev"]

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="the probe's syscall numbers are x86_64's")


@pytest.fixture
def targets(tmp_path, bbl_env, marker):
    """On the host: a canary file, a TCP listener on 127.0.0.1, the daemon's socket path, an
    abstract unix socket (as X11 and D-Bus have) and a SysV shared memory segment."""
    import ctypes

    canary = tmp_path / "canary"
    canary.write_text("host secret\n")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + marker)
    abstract.listen(1)
    libc = ctypes.CDLL(None, use_errno=True)
    key = os.getpid() | 0x5BB0000
    segment = libc.shmget(ctypes.c_int(key), ctypes.c_size_t(4096), ctypes.c_int(0o1600))
    assert segment >= 0
    socket_path = os.path.join(bbl_env["XDG_RUNTIME_DIR"], "bbl", "bbld.sock")
    try:
        yield [str(canary), str(listener.getsockname()[1]), socket_path, marker, str(key),
               str(os.getpid())]
    finally:
        listener.close()
        abstract.close()
        libc.shmctl(ctypes.c_int(segment), ctypes.c_int(0), None)  # IPC_RMID


def probe_output(result) -> dict:
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def test_the_default_templates_app_layer_holds(instances, tmp_path, targets):
    path = tmp_path / "probe.toml"
    path.write_text(f'net = "none"\ncommand = {json.dumps(["python3", "-c", PROBE, *targets])}\n')
    found = probe_output(instances.ctl("start", str(path), stdin=open(os.devnull)))
    assert sorted(found) == sorted(SECCOMP + ISOLATION)
    assert {name: verdict for name, verdict in found.items() if verdict != "blocked"} == {}


def test_a_strict_bubblewrap_style_run_holds(instances, targets):
    result = instances.ctl("run", *SYSTEM, "--unshare-all", "--die-with-parent",
                           "--new-session", "--", "python3", "-c", PROBE, *targets)
    found = probe_output(result)
    open_ones = {n: found[n] for n in ISOLATION if found[n] != "blocked"}
    assert open_ones == {}  # no filter was asked for: the seccomp checks may be open


def test_the_probe_sees_a_weak_sandbox(instances, tmp_path, targets):
    result = instances.ctl("run", "--ro-bind", "/", "/", "--bind", str(tmp_path),
                           str(tmp_path), "--", "python3", "-c", PROBE, *targets)
    found = probe_output(result)
    for name in ("host canary", "daemon socket", "host TCP listener", "host abstract socket",
                 "host SysV shm", "ioctl TIOCSTI", "unshare(CLONE_NEWUSER)", "personality",
                 "i386 ABI"):
        assert found[name].startswith("OPEN"), (name, found[name])


def test_exec_into_the_app_layer_holds_as_well(instances, tmp_path, targets):
    path = tmp_path / "probe.toml"
    path.write_text('net = "none"\ncommand = ["sleep", "600"]\n')
    instance = instances.ctl("start", str(path), "--detach").stdout.strip()
    instances.ids.append(instance)
    found = probe_output(instances.ctl("exec", instance, "--", "python3", "-c", PROBE,
                                       *targets))
    assert {name: verdict for name, verdict in found.items() if verdict != "blocked"} == {}


def test_a_fork_bomb_stops_at_the_layers_process_limit(instances, tmp_path):
    bomb = ("import os, time\ncount = 0\nfor _ in range(500):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
            "        os._exit(0)\n    count += 1\nprint(count)\n")
    path = tmp_path / "bomb.toml"
    path.write_text(f'limits = {{ nproc = 40 }}\ncommand = {json.dumps(["python3", "-c", bomb])}\n')
    result = instances.ctl("start", str(path), stdin=open(os.devnull))
    assert result.returncode == 0, result.stderr
    assert 0 < int(result.stdout) < 40  # the layer's processes count, not the host's
