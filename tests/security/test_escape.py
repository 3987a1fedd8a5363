"""The probe (tests/security/probe.py) tries to get out of sandboxes: the default template's
app layer, a strict bubblewrap-style run, and a deliberately weak run that proves the probe
can tell when something is open."""

import ctypes
import json
import os
import shutil
import socket
import subprocess

import pytest

from bbld.engine import seccomp
from bbld.limits import DEFAULT_NPROC
from tests.conftest import BBLCTL, app_layer, read_line, run_sandbox, sandbox

PROBE = open(os.path.join(os.path.dirname(__file__), "probe.py")).read()
SECCOMP = ["ioctl TIOCSTI", "ioctl TIOCLINUX", "ioctl TIOCSTI (high bits)", "keyctl",
           "add_key", "request_key", "perf_event_open", "bpf", "userfaultfd", "setns",
           "process_vm_readv", "name_to_handle_at", "open_by_handle_at", "fsopen", "open_tree",
           "move_mount", "mount_setattr", "clone3", "personality", "unshare(CLONE_NEWUSER)",
           "clone(CLONE_NEWUSER)", "ptrace(TRACEME)", "i386 ABI", "x32 ABI",
           "blocked syscalls (x86_64)", "blocked syscalls (i386)"]
ISOLATION = ["host canary", "daemon socket", "daemon's runtime directory", "find the daemon",
             "host TCP listener", "leaked fds", "capabilities", "no_new_privs", "write /usr",
             "/proc/1/root", "/proc/PID/root and cwd", "host under a mount point",
             "host abstract socket", "host SysV shm", "host POSIX shm",
             "host POSIX message queue", "host process visible", "signal the supervisor",
             "ptrace the supervisor", "supervisor's /proc files", "write uid_map", "setgroups",
             "setuid(0)", "setuid binaries", "chroot escape", "open_by_handle_at escape",
             "write read-only mounts", "remount read-only mounts", "unmount a mount"]
SCMP_ARCH_X86_64, SCMP_ARCH_X86 = 0xC000003E, 0x40000003
libc = ctypes.CDLL(None, use_errno=True)
SYSTEM = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib",
          "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev"]

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="the probe's syscall numbers are x86_64's")


@pytest.fixture
def targets(tmp_path, bbl_env, marker):
    """On the host: a canary file, a TCP listener on 127.0.0.1, the daemon's socket path, an
    abstract unix socket (as X11 and D-Bus have), a SysV shared memory segment, a POSIX shared
    memory file and message queue, and this process (to look for)."""
    canary = tmp_path / "canary"
    canary.write_text("host secret\n")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0" + marker)
    abstract.listen(1)
    key = os.getpid() | 0x5BB0000
    segment = libc.shmget(ctypes.c_int(key), ctypes.c_size_t(4096), ctypes.c_int(0o1600))
    assert segment >= 0
    name = f"bbl-probe-{os.getpid()}"
    posix_shm = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    queue = libc.mq_open(f"/{name}".encode(), ctypes.c_int(os.O_CREAT | os.O_RDWR),
                         ctypes.c_int(0o600), None)
    assert queue >= 0, os.strerror(ctypes.get_errno())
    socket_path = os.path.join(bbl_env["XDG_RUNTIME_DIR"], "bbl", "bbld.sock")
    try:
        yield {"canary": str(canary), "port": listener.getsockname()[1],
               "daemon_socket": socket_path, "abstract": marker, "shm_key": key,
               "host_pid": os.getpid(), "posix_shm": name, "mqueue": name}
    finally:
        listener.close()
        abstract.close()
        libc.shmctl(ctypes.c_int(segment), ctypes.c_int(0), None)  # IPC_RMID
        os.close(posix_shm)
        os.unlink(f"/dev/shm/{name}")
        libc.mq_close(queue)
        libc.mq_unlink(f"/{name}".encode())


def blocked_syscalls(arch: int) -> dict[str, int]:
    """The default policy's denied syscalls, by their numbers on `arch` (libseccomp's)."""
    lib = seccomp._libseccomp()
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    names = {name for group in seccomp.groups_of("default") for name in
             seccomp.GROUPS.get(group, ())}
    numbers = {name: lib.seccomp_syscall_resolve_name_arch(arch, name.encode())
               for name in names}
    return {name: number for name, number in numbers.items() if number >= 0}


def with_syscalls(targets):
    return {**targets, "syscalls": blocked_syscalls(SCMP_ARCH_X86_64),
            "syscalls_i386": blocked_syscalls(SCMP_ARCH_X86)}


def probe_command(targets):
    return ["python3", "-c", PROBE, json.dumps(targets)]


def probe_output(result) -> dict:
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("net", ["none", "nat"])
def test_the_default_templates_app_layer_holds(instances, tmp_path, targets, net):
    if net == "nat" and not (shutil.which("pasta") and os.access("/dev/net/tun", os.W_OK)):
        pytest.skip("needs pasta and a usable /dev/net/tun (.ci/run, tests/run.sh)")
    path = tmp_path / "probe.toml"
    command = probe_command(with_syscalls(targets))
    path.write_text(f'net = "{net}"\ncommand = {json.dumps(command)}\n')
    found = probe_output(instances.ctl("start", str(path), stdin=open(os.devnull)))
    assert sorted(found) == sorted(SECCOMP + ISOLATION)
    assert {name: verdict for name, verdict in found.items() if verdict != "blocked"} == {}


def test_a_strict_bubblewrap_style_run_holds(instances, targets):
    result = instances.ctl("run", *SYSTEM, "--unshare-all", "--die-with-parent",
                           "--new-session", "--", *probe_command(targets))
    found = probe_output(result)
    open_ones = {n: found[n] for n in ISOLATION if found[n] != "blocked"}
    assert open_ones == {}  # no filter was asked for: the seccomp checks may be open


def test_the_probe_sees_a_weak_sandbox(instances, tmp_path, targets):
    result = instances.ctl("run", "--ro-bind", "/", "/", "--bind", str(tmp_path),
                           str(tmp_path), "--", *probe_command(targets))
    found = probe_output(result)
    # It sees bbld's socket and the instances' (their files), but neither serves it.
    assert found["find the daemon"] == "blocked"
    for name in ("host canary", "daemon socket", "daemon's runtime directory",
                 "host TCP listener", "host abstract socket", "host SysV shm", "host POSIX shm",
                 "host POSIX message queue", "host under a mount point", "chroot escape",
                 "ioctl TIOCSTI", "unshare(CLONE_NEWUSER)", "personality", "i386 ABI"):
        assert found[name].startswith("OPEN"), (name, found[name])


def test_exec_into_the_app_layer_holds_as_well(instances, tmp_path, targets):
    path = tmp_path / "probe.toml"
    path.write_text('net = "none"\ncommand = ["sleep", "600"]\n')
    instance = instances.ctl("start", str(path), "--detach").stdout.strip()
    instances.ids.append(instance)
    found = probe_output(instances.ctl("exec", instance, "--",
                                       *probe_command(with_syscalls(targets))))
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


# forks sleepers (exec'd: a few hundred KB each) until fork fails, says how many, and stays
EXEC_BOMB = ("import os, sys, time\ncount = 0\nwhile count < 100000:\n    try:\n"
             "        pid = os.fork()\n    except OSError:\n        break\n    if pid == 0:\n"
             "        os.execv('/bin/sleep', ['sleep', '120'])\n    count += 1\n"
             "print(count, flush=True)\ntime.sleep(120)\n")


def test_the_default_template_stops_a_fork_bomb_and_the_host_still_forks(instances, tmp_path):
    """No `limits` in the profile: the app's layer still stops at the default process limit
    (bbld.limits.DEFAULT_NPROC), and while the bomb's processes live the host forks."""
    path = tmp_path / "bomb.toml"
    path.write_text(f'command = {json.dumps(["python3", "-c", EXEC_BOMB])}\n')
    bomb = subprocess.Popen([*BBLCTL, "start", str(path)], env=instances.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        count = int(read_line(bomb.stdout, timeout=120))
        assert DEFAULT_NPROC - 50 < count < DEFAULT_NPROC  # (the layer's own few, then it)
        assert subprocess.run(["true"], timeout=30).returncode == 0  # the host still forks
    finally:
        [entry] = json.loads(instances.ctl("ps", "--json").stdout)
        instances.ctl("kill", "--signal", "KILL", entry["id"])
        bomb.wait(timeout=60)
        bomb.stdout.close()


def test_the_probe_sees_a_layer_that_keeps_sys_admin(tmp_path):
    """Mounts a layer made in its own user namespace are not locked: with CAP_SYS_ADMIN
    there, its command can undo them, and the probe must say so."""
    spec = sandbox(app_layer(command=probe_command({}), caps=["sys_admin"]))
    found = probe_output(run_sandbox(tmp_path, spec))
    for name in ("capabilities", "remount read-only mounts", "unmount a mount"):
        assert found[name].startswith("OPEN"), (name, found[name])
