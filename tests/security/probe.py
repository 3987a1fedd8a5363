"""A probe run *inside* a sandbox: it tries to get out, and says what worked.

    python3 probe.py [CANARY_PATH] [TCP_PORT] [DAEMON_SOCKET] [ABSTRACT_NAME] [SHM_KEY]
                     [HOST_PID]

prints one JSON object: check name -> "blocked" or "OPEN: what happened". Standard library
only (it runs with whatever Python the sandbox has). Syscalls are called with arguments the
kernel would reject in another way (EBADF, EFAULT, EINVAL), so that EPERM/ENOSYS tell the
seccomp filter's answer apart from the kernel's.
"""

import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"keyctl": 250, "add_key": 248, "request_key": 249, "perf_event_open": 298, "bpf": 321,
      "userfaultfd": 323, "setns": 308, "unshare": 272, "clone3": 435, "personality": 135,
      "ptrace": 101, "process_vm_readv": 310, "name_to_handle_at": 303, "fsopen": 430,
      "open_tree": 428, "move_mount": 429, "mount_setattr": 442, "ioctl": 16, "mount": 165,
      "pivot_root": 155, "chroot": 161, "umount2": 166}  # x86_64
results = {}


def syscall(name, *args):
    result = libc.syscall(NR[name], *[ctypes.c_long(a) for a in args])
    return result, ctypes.get_errno() if result == -1 else 0


def filtered(name, *args, denied=errno.EPERM):
    """The filter answers `denied` before the kernel looks at the (bad) arguments."""
    result, err = syscall(name, *args)
    results[name] = "blocked" if result == -1 and err == denied else \
        f"OPEN: returned {result} ({errno.errorcode.get(err, err)})"


def in_child(check, body):
    """Run `body` in a child; blocked if it returns True or the child dies of SIGSYS."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if body() else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
        results[check] = "blocked"
    elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        results[check] = "blocked"
    else:
        results[check] = f"OPEN: child ended with {status:#x}"


def machine_code(code: bytes) -> bool:
    """Run raw x86_64 code (returns normally only if the syscall was allowed)."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ctypes.CFUNCTYPE(ctypes.c_long)(address)()
    return False  # still alive: the other ABI's syscall ran


def seccomp_checks():
    filtered("ioctl", -1, 0x5412, 0)  # TIOCSTI on a bad fd: EBADF unless filtered
    results["ioctl TIOCSTI"] = results.pop("ioctl")
    filtered("ioctl", -1, 0x541C, 0)
    results["ioctl TIOCLINUX"] = results.pop("ioctl")
    filtered("ioctl", -1, 0x1_0000_5412, 0)  # high bits set: still TIOCSTI to the kernel
    results["ioctl TIOCSTI (high bits)"] = results.pop("ioctl")
    filtered("keyctl", 0x7FFFFFFF)
    filtered("add_key", 0, 0, 0, 0, 0)
    filtered("request_key", 0, 0, 0, 0)
    filtered("perf_event_open", 0, 0, -1, -1, 0)
    filtered("bpf", -1, 0, 0)
    filtered("userfaultfd", -1)
    filtered("setns", -1, 0)
    filtered("process_vm_readv", os.getpid(), 0, 0, 0, 0, 0)
    filtered("name_to_handle_at", -1, 0, 0, 0, 0)
    filtered("fsopen", 0, 0)
    filtered("open_tree", -1, 0, 0)
    filtered("move_mount", -1, 0, -1, 0, 0)
    filtered("mount_setattr", -1, 0, 0, 0, 0)
    filtered("clone3", 0, 0, denied=errno.ENOSYS)
    filtered("personality", 0x0040000)  # ADDR_NO_RANDOMIZE: would succeed unfiltered
    in_child("unshare(CLONE_NEWUSER)",
             lambda: syscall("unshare", 0x10000000) == (-1, errno.EPERM))
    in_child("ptrace(TRACEME)", lambda: syscall("ptrace", 0, 0, 0, 0) == (-1, errno.EPERM))
    # i386: mov eax, 20 (getpid); int 0x80; ret   x32: mov eax, 39|0x40000000; syscall; ret
    in_child("i386 ABI", lambda: machine_code(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"))
    in_child("x32 ABI", lambda: machine_code(b"\xb8\x27\x00\x00\x40\x0f\x05\xc3"))


def privilege_checks(host_pid):
    if host_pid:
        results["host process visible"] = "OPEN: in /proc" if os.path.exists(
            f"/proc/{host_pid}") else "blocked"
    try:  # our pid namespace's pid 1 is a supervisor: it must ignore us
        os.kill(1, signal.SIGKILL)
        results["signal the supervisor"] = "blocked" if os.path.exists("/proc/1") else \
            "OPEN: pid 1 is gone"
    except OSError:
        results["signal the supervisor"] = "blocked"
    try:
        with open("/proc/self/uid_map", "w") as f:
            f.write("0 0 1\n")
        results["write uid_map"] = "OPEN: written"
    except OSError:
        results["write uid_map"] = "blocked"
    try:
        os.setgroups([0])
        results["setgroups"] = "OPEN: now in group 0"
    except OSError:
        results["setgroups"] = "blocked"
    try:
        os.setuid(0)
        results["setuid(0)"] = "blocked" if os.getuid() == 0 and _no_caps() else "OPEN"
    except OSError:
        results["setuid(0)"] = "blocked"


def _no_caps():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return status["CapEff"].strip() == "0000000000000000"


def isolation_checks(canary, port, daemon_socket, abstract, shm_key):
    if abstract:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect("\0" + abstract)
                results["host abstract socket"] = "OPEN: connected"
            except OSError:
                results["host abstract socket"] = "blocked"
    if shm_key:
        found = libc.shmget(ctypes.c_int(int(shm_key)), ctypes.c_size_t(0), ctypes.c_int(0))
        results["host SysV shm"] = "blocked" if found == -1 else f"OPEN: shm id {found}"
    if canary:
        results["host canary"] = "OPEN: visible" if os.path.exists(canary) else "blocked"
    if daemon_socket:
        results["daemon socket"] = "OPEN: visible" if os.path.exists(daemon_socket) \
            else "blocked"
    if port:
        with socket.socket() as probe:
            probe.settimeout(2)
            try:
                probe.connect(("127.0.0.1", int(port)))
                results["host TCP listener"] = "OPEN: connected"
            except OSError:
                results["host TCP listener"] = "blocked"
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    extra = [fd for fd in fds if fd > 2 and not _is_listing(fd)]
    results["leaked fds"] = "blocked" if not extra else f"OPEN: {extra}"
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    caps = {k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
    results["capabilities"] = "blocked" if set(caps.values()) == {"0000000000000000"} \
        else f"OPEN: {caps}"
    results["no_new_privs"] = "blocked" if status["NoNewPrivs"].strip() == "1" else "OPEN"
    try:
        with open("/usr/.bbl-probe", "w"):
            results["write /usr"] = "OPEN: created /usr/.bbl-probe"
        os.unlink("/usr/.bbl-probe")
    except OSError:
        results["write /usr"] = "blocked"
    root_link = os.readlink("/proc/1/root") if os.path.exists("/proc/1/root") else "/"
    results["/proc/1/root"] = "blocked" if root_link == "/" or _unreadable("/proc/1/root") \
        else f"OPEN: {root_link}"


def _is_listing(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/proc/")
    except OSError:
        return True  # closed meanwhile: the listing's own


def _unreadable(path):
    try:
        os.listdir(path)
        return False
    except OSError:
        return True


if __name__ == "__main__":
    args = sys.argv[1:] + [""] * 6
    seccomp_checks()
    isolation_checks(*args[:5])
    privilege_checks(args[5])
    print(json.dumps(results, indent=1, sort_keys=True))
