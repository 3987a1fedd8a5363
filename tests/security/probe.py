"""A probe run *inside* a sandbox: it tries to get out, and says what worked.

    python3 probe.py '{"canary": PATH, "port": N, ...}'

The one argument names the host's targets (all optional, see test_escape.py's `targets`).
Prints one JSON object: check name -> "blocked" or "OPEN: what happened". Standard library
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
import stat
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {"keyctl": 250, "add_key": 248, "request_key": 249, "perf_event_open": 298, "bpf": 321,
      "userfaultfd": 323, "setns": 308, "unshare": 272, "clone": 56, "clone3": 435,
      "personality": 135, "ptrace": 101, "process_vm_readv": 310, "name_to_handle_at": 303,
      "open_by_handle_at": 304, "fsopen": 430, "open_tree": 428, "move_mount": 429,
      "mount_setattr": 442, "ioctl": 16, "mount": 165, "umount2": 166}  # x86_64
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
MS_REMOUNT, MS_BIND, MNT_DETACH = 0x20, 0x1000, 2
AT_FDCWD = -100
results = {}


def syscall(name_or_number, *args):
    number = NR.get(name_or_number, name_or_number)
    result = libc.syscall(number, *[ctypes.c_long(a) for a in args])
    return result, ctypes.get_errno() if result == -1 else 0


def filtered(name, *args, denied=errno.EPERM):
    """The filter answers `denied` before the kernel looks at the (bad) arguments."""
    result, err = syscall(name, *args)
    results[name] = "blocked" if result == -1 and err == denied else \
        f"OPEN: returned {result} ({errno.errorcode.get(err, err)})"


def in_child(check, body):
    """Run `body` in a child; blocked if it returns True or the child dies of SIGSYS. A body
    may return a string instead: what it managed to do."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        try:
            verdict = body()
            os.write(writer, (verdict if isinstance(verdict, str) else "").encode())
            os._exit(0 if verdict is True else 1)
        except BaseException as error:
            os.write(writer, f"{type(error).__name__}: {error}".encode())
            os._exit(2)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        said = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
        results[check] = "blocked"
    elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        results[check] = "blocked"
    else:
        results[check] = f"OPEN: {said or f'child ended with {status:#x}'}"


def machine_code(code: bytes) -> bool:
    """Run raw x86_64 code (returns normally only if the syscall was allowed)."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    ctypes.CFUNCTYPE(ctypes.c_long)(address)()
    return False  # still alive: the other ABI's syscall ran


def i386_syscall(number: int) -> bytes:
    """mov eax, number; int 0x80; ret"""
    return b"\xb8" + number.to_bytes(4, "little") + b"\xcd\x80\xc3"


def become_root_in_a_new_namespace() -> bool:
    """What an attacker does first where the filter allows it: a user namespace of its own,
    where it has every capability, with a mount namespace copied from the sandbox's."""
    uid, gid = os.getuid(), os.getgid()
    if syscall("unshare", CLONE_NEWUSER | CLONE_NEWNS)[0] != 0:
        return False
    try:
        for name, text in (("uid_map", f"0 {uid} 1"), ("setgroups", "deny"),
                           ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:  # a read-only /proc: we stay nobody in the new namespace
        return False
    return True


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
    filtered("open_by_handle_at", -1, 0, 0)
    filtered("fsopen", 0, 0)
    filtered("open_tree", -1, 0, 0)
    filtered("move_mount", -1, 0, -1, 0, 0)
    filtered("mount_setattr", -1, 0, 0, 0, 0)
    filtered("clone3", 0, 0, denied=errno.ENOSYS)
    filtered("personality", 0x0040000)  # ADDR_NO_RANDOMIZE: would succeed unfiltered
    in_child("unshare(CLONE_NEWUSER)",
             lambda: syscall("unshare", CLONE_NEWUSER) == (-1, errno.EPERM))
    in_child("clone(CLONE_NEWUSER)", clone_a_user_namespace)
    in_child("ptrace(TRACEME)", lambda: syscall("ptrace", 0, 0, 0, 0) == (-1, errno.EPERM))
    # x32: mov eax, 39|0x40000000 (getpid); syscall; ret
    in_child("i386 ABI", lambda: machine_code(i386_syscall(20)))  # getpid
    in_child("x32 ABI", lambda: machine_code(b"\xb8\x27\x00\x00\x40\x0f\x05\xc3"))


def clone_a_user_namespace():
    # a stack pointer of 1: if the clone happened, its child crashes at once
    pid, err = syscall("clone", CLONE_NEWUSER | signal.SIGCHLD, 1, 0, 0, 0)
    if pid > 0:
        os.waitpid(pid, 0)
        return "cloned a child into a new user namespace"
    return err == errno.EPERM


def every_blocked_syscall(native, i386):
    """Each syscall the policy denies, by number: EPERM natively, death on the i386 ABI."""
    if native:
        allowed = []
        for name, number in sorted(native.items()):
            result, err = syscall(number, -1, -1, -1, -1, -1, -1)
            if not (result == -1 and err == errno.EPERM):
                allowed.append(f"{name} ({errno.errorcode.get(err, result)})")
        results["blocked syscalls (x86_64)"] = "blocked" if not allowed else \
            f"OPEN: {', '.join(allowed)}"
    if i386:
        allowed = []
        for name, number in sorted(i386.items()):
            in_child("i386", lambda number=number: machine_code(i386_syscall(number)))
            if results.pop("i386") != "blocked":
                allowed.append(name)
        results["blocked syscalls (i386)"] = "blocked" if not allowed else \
            f"OPEN: {', '.join(allowed)}"


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
    in_child("ptrace the supervisor", lambda: syscall("ptrace", 16, 1, 0, 0)[0] == -1)
    readable = [name for name in ("mem", "environ", "maps", "fd") if _can_open(f"/proc/1/{name}")]
    results["supervisor's /proc files"] = "blocked" if not readable else f"OPEN: {readable}"
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
    setuid_binaries()


def files_under(tops, depth):
    """Paths of the files in `tops`, at most `depth` directories down (deeper ones are not
    even walked: a weak sandbox may see a whole home)."""
    for top in tops:
        for directory, subdirectories, files in os.walk(top):
            if directory.count("/") >= top.count("/") + depth:
                subdirectories.clear()
            yield from (os.path.join(directory, name) for name in files)


def _can_open(path):
    try:
        os.close(os.open(path, os.O_RDONLY))
        return True
    except OSError:
        return False


def _status():
    with open("/proc/self/status") as f:
        return {key: value.strip() for key, value in (line.split(":", 1) for line in f)}


def _no_caps():
    return _status()["CapEff"] == "0000000000000000"


def setuid_binaries():
    """A set-id program gives its owner's identity only if no_new_privs is off, its mount is
    not nosuid, and its owner is mapped in our user namespace (unmapped owners show as the
    overflow id 65534): the kernel's rule, checked for each one we can find."""
    if _status()["NoNewPrivs"] == "1":
        results["setuid binaries"] = "blocked"
        return
    found = []
    for path in files_under(("/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib", "/bin",
                             "/sbin"), depth=2):
        try:
            info = os.stat(path)
            nosuid = os.statvfs(path).f_flag & os.ST_NOSUID
        except OSError:
            continue
        if nosuid or not info.st_mode & 0o111:
            continue
        if info.st_mode & stat.S_ISUID and info.st_uid not in (os.getuid(), 65534) or \
                info.st_mode & stat.S_ISGID and info.st_gid not in (os.getgid(), 65534):
            found.append(path)
    results["setuid binaries"] = "blocked" if not found else f"OPEN: {sorted(set(found))[:5]}"


def isolation_checks(targets):
    if "abstract" in targets:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect("\0" + targets["abstract"])
                results["host abstract socket"] = "OPEN: connected"
            except OSError:
                results["host abstract socket"] = "blocked"
    if "shm_key" in targets:
        found = libc.shmget(ctypes.c_int(targets["shm_key"]), ctypes.c_size_t(0), ctypes.c_int(0))
        results["host SysV shm"] = "blocked" if found == -1 else f"OPEN: shm id {found}"
    if "posix_shm" in targets:
        results["host POSIX shm"] = "OPEN: visible" if os.path.exists(
            "/dev/shm/" + targets["posix_shm"]) else "blocked"
    if "mqueue" in targets:
        queue = libc.mq_open(("/" + targets["mqueue"]).encode(), ctypes.c_int(os.O_RDONLY))
        results["host POSIX message queue"] = "blocked" if queue == -1 else "OPEN: opened"
        if queue != -1:
            os.close(queue)
    if "canary" in targets:
        results["host canary"] = "OPEN: visible" if os.path.exists(targets["canary"]) \
            else "blocked"
    if "daemon_socket" in targets:
        results["daemon socket"] = "OPEN: visible" if os.path.exists(targets["daemon_socket"]) \
            else "blocked"
        runtime = os.path.dirname(targets["daemon_socket"])  # also every instance's socket
        results["daemon's runtime directory"] = "OPEN: visible" if os.path.exists(runtime) \
            else "blocked"
    results["find the daemon"] = find_the_daemon()
    if "port" in targets:
        with socket.socket() as probe:
            probe.settimeout(2)
            try:
                probe.connect(("127.0.0.1", targets["port"]))
                results["host TCP listener"] = "OPEN: connected"
            except OSError:
                results["host TCP listener"] = "blocked"
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    extra = [fd for fd in fds if fd > 2 and not _is_listing(fd)]
    results["leaked fds"] = "blocked" if not extra else f"OPEN: {extra}"
    status = _status()
    caps = {k: status[k] for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
    results["capabilities"] = "blocked" if set(caps.values()) == {"0000000000000000"} \
        else f"OPEN: {caps}"
    results["no_new_privs"] = "blocked" if status["NoNewPrivs"] == "1" else "OPEN"
    try:
        with open("/usr/.bbl-probe", "w"):
            results["write /usr"] = "OPEN: created /usr/.bbl-probe"
        os.unlink("/usr/.bbl-probe")
    except OSError:
        results["write /usr"] = "blocked"


def find_the_daemon():
    """Every unix socket file in the usual places (and the abstract ones /proc/net/unix
    names): none may answer bbld's Ping, nor an instance's control request (an error reply,
    PermissionDenied, is an answer that serves nothing)."""
    candidates = set()
    for path in files_under(("/run", "/var/run", "/tmp", "/home", "/dev/shm", "/var/tmp",
                             os.environ.get("XDG_RUNTIME_DIR", "/run")), depth=4):
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                candidates.add(path)
        except OSError:
            pass
    try:
        with open("/proc/net/unix") as f:
            candidates.update("\0" + line.split()[7][1:] for line in f
                              if len(line.split()) > 7 and line.split()[7].startswith("@"))
    except OSError:
        pass
    answered = [path.replace("\0", "@") for path in sorted(candidates) if _is_bbld(path)]
    return "blocked" if not answered else f"OPEN: {answered}"


def _is_bbld(path):
    for kind, request, served in ((socket.SOCK_STREAM, b'{"method": "io.bbl.Manager.Ping"}\0',
                                   b'"pid"'),
                                  (socket.SOCK_SEQPACKET, b'{"op": "status"}', b'"entry"')):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            probe.settimeout(1)
            try:
                probe.connect(path)
                probe.sendall(request)
                if served in probe.recv(65536):
                    return True
            except OSError:
                pass
    return False


def _is_listing(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/proc/")
    except OSError:
        return True  # closed meanwhile: the listing's own


def mounts():
    """(mount point, per-mount options) of our mount namespace, deepest last."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 and the like
            found.append((point, fields[5].split(",")))
    return found


def old_root_checks(canary):
    """The host's root must be gone, not merely hidden: no mount, no /proc link of any
    process we can see, no walk up from any working directory leads out of our root."""
    if canary:
        seen = [point for point, _ in mounts()
                if os.path.exists(point.rstrip("/") + canary)]
        results["host under a mount point"] = "blocked" if not seen else f"OPEN: {seen}"
    ours = os.stat("/")
    outside = []
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        for link in ("root", "cwd"):
            place = _top_of(f"/proc/{pid}/{link}")
            if place is not None and place != (ours.st_dev, ours.st_ino):
                outside.append(f"{pid}/{link}")
    results["/proc/PID/root and cwd"] = "blocked" if not outside else f"OPEN: {outside}"
    results["/proc/1/root"] = "blocked" if "1/root" not in outside else "OPEN: another root"


def _top_of(path):
    """Where walking `..` from `path` stops, as (dev, ino); None if we may not open it. A
    directory outside our root walks up to a top that is not our root."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for _ in range(4096):
            here = os.fstat(fd)
            parent = os.open("..", os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            up = os.fstat(fd)
            if (up.st_dev, up.st_ino) == (here.st_dev, here.st_ino):
                return up.st_dev, up.st_ino
        return None
    finally:
        os.close(fd)


def chroot_escape(canary):
    """The classic: chroot into a subdirectory, keep the working directory outside it, walk
    up, chroot there. At best it reaches the sandbox's own root."""
    ours = os.stat("/")
    become_root_in_a_new_namespace()
    os.chdir("/")
    try:
        os.chroot("/proc")
    except OSError:
        return True
    for _ in range(64):
        os.chdir("..")
    os.chroot(".")
    now = os.stat("/")
    if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
        return "reached another root"
    return "the host canary is visible" if canary and os.path.exists(canary) else True


def file_handle_escape():
    """'Shocker': forge a handle of the filesystem's root inode (ext4's 2) and open it through
    the /usr mount, reaching files outside what is mounted."""
    become_root_in_a_new_namespace()
    handle = ctypes.create_string_buffer(8 + 128)
    ctypes.c_uint32.from_buffer(handle).value = 128
    mount_id = ctypes.c_int()
    if libc.syscall(NR["name_to_handle_at"], AT_FDCWD, b"/usr", handle,
                    ctypes.byref(mount_id), 0) != 0:
        return True
    kind = ctypes.c_int.from_buffer(handle, 4).value
    if kind != 1:  # FILEID_INO32_GEN: the only layout forged here
        return True
    ctypes.c_uint32.from_buffer(handle, 0).value = 8
    ctypes.c_uint32.from_buffer(handle, 8).value = 2  # inode 2, generation 0
    ctypes.c_uint32.from_buffer(handle, 12).value = 0
    where = os.open("/usr", os.O_RDONLY | os.O_DIRECTORY)
    fd = libc.syscall(NR["open_by_handle_at"], where, handle, os.O_RDONLY | os.O_DIRECTORY)
    if fd >= 0:
        return f"opened the root of /usr's filesystem: {sorted(os.listdir(fd))[:5]}"
    return True


def read_only_checks():
    """Every read-only mount stays so: no write, no remount, no clearing of the flag with
    mount_setattr, and no mount can be taken off to show what it covers. Tried in a child,
    in our namespace and as root of a new user namespace where the filter allows one."""
    writable = [point for point in read_only() if _writable(point)]
    results["write read-only mounts"] = "blocked" if not writable else f"OPEN: {writable}"
    in_child("remount read-only mounts", _remount_all)
    in_child("unmount a mount", _unmount_all)


def read_only():
    """Mount points whose visible (topmost) mount is read-only, deepest first."""
    points = dict.fromkeys(point for point, _ in reversed(mounts()))
    return [point for point in points if _flags(point) & os.ST_RDONLY]


def _flags(point):
    try:
        return os.statvfs(point).f_flag
    except OSError:
        return 0


def _writable(point):
    try:
        info = os.stat(point)
        if stat.S_ISDIR(info.st_mode):
            fd = os.open(os.path.join(point, ".bbl-probe"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.unlink(os.path.join(point, ".bbl-probe"))
        elif stat.S_ISREG(info.st_mode):
            fd = os.open(point, os.O_WRONLY | os.O_APPEND)
        else:
            return False  # a device node: writing one is not writing the mount
        os.close(fd)
        return True
    except OSError:
        return False


def _remount_all():
    """In our own namespace first (where capabilities would be the hole), then as root of a
    new one."""
    done = _remount()
    if not done and become_root_in_a_new_namespace():
        done = _remount()
    return True if not done else f"made writable: {done}"


def _remount():
    attr = (ctypes.c_uint64 * 4)(0, 1, 0, 0)  # attr_clr = MOUNT_ATTR_RDONLY
    before = read_only()
    for point in before:
        path = point.encode()
        libc.mount(None, path, None, MS_REMOUNT | MS_BIND, None)
        libc.mount(None, path, None, MS_REMOUNT, None)
        libc.syscall(NR["mount_setattr"], AT_FDCWD, path, 0, attr, 32)
    return [point for point in before if not _flags(point) & os.ST_RDONLY]


def _unmount_all():
    done = _unmount(mounts())
    if not done and become_root_in_a_new_namespace():
        done = _unmount(mounts())
    return True if not done else f"unmounted: {done}"


def _unmount(found):
    return [point for point, _ in reversed(found)
            if point != "/" and libc.umount2(point.encode(), MNT_DETACH) == 0]


if __name__ == "__main__":
    targets = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    seccomp_checks()
    every_blocked_syscall(targets.get("syscalls"), targets.get("syscalls_i386"))
    isolation_checks(targets)
    old_root_checks(targets.get("canary"))
    privilege_checks(targets.get("host_pid"))
    in_child("chroot escape", lambda: chroot_escape(targets.get("canary")))
    in_child("open_by_handle_at escape", file_handle_escape)
    read_only_checks()  # last: where it fails, it changes the mounts the others look at
    print(json.dumps(results, indent=1, sort_keys=True))
