"""The kernel-facing layer: thin ctypes wrappers around the syscalls the engine needs.

Everything else in BBL calls these functions instead of touching ctypes. Each wrapper raises
OSError with errno on failure and does nothing clever. The syscalls added since Linux 5.x
(clone3, pidfd, the new mount API, openat2, close_range) have the same number on every
architecture, so they are called by number; the classic ones go through glibc.
"""

import _signal
import ctypes
import errno
import os
import signal
import struct

_libc = ctypes.CDLL(None, use_errno=True)
# clone3 must run with the GIL held, exactly like os.fork(): PyDLL does not release it.
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc_gil.syscall.restype = ctypes.c_long
# Looked up now, in the forker: CDLL finds a function (dlsym, a new object) at its first use,
# which every forked monitor, supervisor and command would otherwise do again.
for _name in ("capget", "capset", "fstatfs", "inotify_add_watch", "inotify_init1", "mount",
              "pivot_root", "prctl", "sethostname", "setns", "signalfd", "umount2", "unshare"):
    getattr(_libc, _name)
for _name in ("PyOS_BeforeFork", "PyOS_AfterFork_Child", "PyOS_AfterFork_Parent"):
    getattr(ctypes.pythonapi, _name)

# --- syscall numbers (unified table from 424 on; pivot_root differs per architecture) ---
SYS_pidfd_send_signal = 424
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_pidfd_open = 434
SYS_clone3 = 435
SYS_close_range = 436
SYS_openat2 = 437
SYS_mount_setattr = 442

# --- clone / unshare flags ---
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_PIDFD = 0x00001000
CLONE_PARENT = 0x00008000  # clone3 wants exit_signal 0 with it; wait with __WALL
CLONE_INTO_CGROUP = 0x200000000  # clone3 only: the child starts in the cgroup args.cgroup names
WALL = 0x40000000  # __WALL: wait for children whatever their exit signal
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# --- mount(2) flags ---
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

# --- new mount API ---
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

# --- openat2 resolve flags ---
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

# --- prctl ---
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

PROC_SUPER_MAGIC = 0x9FA0
NSFS_MAGIC = 0x6E736673
NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: an fd of the user namespace owning it
NS_GET_PARENT = 0xB702  # ioctl on a user (or pid) namespace fd: its parent's

# --- terminals ---
TIOCSPTLCK = 0x40045431  # unlock a pty pair
TIOCGPTPEER = 0x5441  # open the peer of a pty master (race-free, kernel >= 4.13)
TIOCSCTTY = 0x540E
TIOCSIG = 0x40045436  # on a pty master: signal the slave's foreground process group


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _path(p: str | None) -> bytes | None:
    return None if p is None else os.fsencode(p)


# --- processes ---


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal",
            "stack", "stack_size", "tls", "set_tid", "set_tid_size", "cgroup",
        )
    ]


def clone(flags: int, exit_signal: int = signal.SIGCHLD,
          cgroup_fd: int | None = None) -> tuple[int, int]:
    """fork() into new namespaces in one step, like clone3(2) in C.

    Returns (pid, pidfd) in the parent and (0, -1) in the child. Creating the user and pid
    namespaces in the same call makes the child pid 1 of a pid namespace owned by its own
    user namespace, and keeps it a direct child of the caller (no intermediate process).
    With `cgroup_fd` (a cgroup directory opened O_RDONLY) the child is born in that cgroup:
    nothing it forks can be counted anywhere else first.
    """
    pidfd = ctypes.c_int(-1)
    args = _CloneArgs(flags=flags | CLONE_PIDFD, pidfd=ctypes.addressof(pidfd),
                      exit_signal=exit_signal)
    if cgroup_fd is not None:
        args.flags |= CLONE_INTO_CGROUP
        args.cgroup = cgroup_fd
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(SYS_clone3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0, -1
    err = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid, pidfd.value


def pidfd_open(pid: int) -> int:
    return _check(_libc.syscall(SYS_pidfd_open, pid, 0))


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(_libc.syscall(SYS_pidfd_send_signal, pidfd, sig, None, 0))


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    _check(_libc.syscall(SYS_close_range, ctypes.c_uint(first), ctypes.c_uint(last), 0))


def close_all_fds_except(keep) -> None:
    """Close every fd except those in `keep` (close_range over the gaps)."""
    start = 0
    for fd in sorted(set(keep)):
        if fd > start:
            close_range(start, fd - 1)
        start = max(start, fd + 1)
    close_range(start)


# prctl with integer arguments, declared so that ctypes converts them itself: making four
# c_ulong objects per call cost a fresh process dearly (restrict_capabilities makes 42 calls;
# docs/performance.md).
# (Its own function object: seccomp_load passes a pointer to the plain one.)
_prctl = _libc["prctl"]
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_prctl(option, arg2, arg3, arg4, arg5))


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags))


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype))


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)))


# --- mounts ---


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_path(source), _path(target), _path(fstype), ctypes.c_ulong(flags),
                       _path(data)))


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_path(target), flags))


_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}  # for glibc < 2.36


def pivot_root(new_root: str, put_old: str) -> None:
    if hasattr(_libc, "pivot_root"):
        _check(_libc.pivot_root(_path(new_root), _path(put_old)))
        return
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(errno.ENOSYS, "pivot_root: unknown syscall number on this architecture")
    _check(_libc.syscall(number, _path(new_root), _path(put_old)))


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return _check(_libc.syscall(SYS_open_tree, dirfd, _path(path), ctypes.c_uint(flags)))


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach the detached mount `from_fd` on the object `to_fd` refers to."""
    _check(_libc.syscall(SYS_move_mount, from_fd, b"", to_fd, b"",
                         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)))


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(fd: int, attr_set: int, recursive: bool = True) -> None:
    """Set mount attributes on the mount `fd` refers to (and every submount if recursive)."""
    attr = _MountAttr(attr_set=attr_set)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_libc.syscall(SYS_mount_setattr, fd, b"", ctypes.c_uint(flags), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))))


def fsmount_new(fstype: str, options: dict[str, str | None], attrs: int) -> int:
    """Create a new superblock of `fstype` and return a detached mount fd for it. Its source
    (mountinfo's) is `fstype` unless the options say otherwise, as mount(8) would have it."""
    fs_fd = _check(_libc.syscall(SYS_fsopen, _path(fstype), ctypes.c_uint(FSOPEN_CLOEXEC)))
    try:
        for key, value in {"source": fstype, **options}.items():
            if value is None:
                _check(_libc.syscall(SYS_fsconfig, fs_fd, ctypes.c_uint(FSCONFIG_SET_FLAG),
                                     key.encode(), None, 0))
            else:
                _check(_libc.syscall(SYS_fsconfig, fs_fd, ctypes.c_uint(FSCONFIG_SET_STRING),
                                     key.encode(), os.fsencode(value), 0))
        _check(_libc.syscall(SYS_fsconfig, fs_fd, ctypes.c_uint(FSCONFIG_CMD_CREATE),
                             None, None, 0))
        return _check(_libc.syscall(SYS_fsmount, fs_fd, ctypes.c_uint(FSMOUNT_CLOEXEC),
                                    ctypes.c_uint(attrs)))
    finally:
        os.close(fs_fd)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=resolve)
    return _check(_libc.syscall(SYS_openat2, dirfd, _path(path), ctypes.byref(how),
                                ctypes.c_size_t(ctypes.sizeof(how))))


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fstatfs_type(fd: int) -> int:
    buf = _Statfs()
    _check(_libc.fstatfs(fd, ctypes.byref(buf)))
    return buf.f_type


# --- capabilities and seccomp ---


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CapSets = _CapData * 2  # (made once here: an array type is a new class, slow to make cold)


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capget_permitted() -> int:
    """This thread's permitted capability set (a 64-bit mask)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapSets()
    _check(_libc.capget(ctypes.byref(header), data))
    return data[0].permitted | (data[1].permitted << 32)


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the three capability sets of this thread (64-bit masks)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapSets()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(header), data))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_load(program: bytes) -> None:
    """Install a classic BPF seccomp program (an array of 8-byte sock_filter)."""
    if not program or len(program) % 8:
        raise OSError(errno.EINVAL, "seccomp program must be a non-empty multiple of 8 bytes")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)))


# --- inotify ---

IN_ATTRIB = 0x004
IN_MOVED_TO = 0x080
IN_CREATE = 0x100


def inotify_watch(path: str, mask: int) -> int:
    """A non-blocking inotify fd watching `path` for `mask` events."""
    fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        _check(_libc.inotify_add_watch(fd, _path(path), ctypes.c_uint32(mask)))
    except OSError:
        os.close(fd)
        raise
    return fd


# --- signals ---

_SIGSET_BYTES = 128
SIGNALFD_SIGINFO_SIZE = 128


# signal.py wraps pthread_sigmask and signal: the old mask comes back as a set of Signals and
# the old handler as a Handlers member, enum conversions that cost a freshly forked process
# that cost a freshly forked process dearly (cold code and copy-on-write faults), on every
# command's way to exec (docs/performance.md).
# These call the C functions and return nothing.

def set_signal_mask(how: int, signals) -> None:
    _signal.pthread_sigmask(how, signals)


def default_signal_actions(*signals: int) -> None:
    for signo in signals:
        _signal.signal(signo, _signal.SIG_DFL)


def ignore_signal(signo: int) -> None:
    _signal.signal(signo, _signal.SIG_IGN)


def signal_ignored(signo: int) -> bool:
    return _signal.getsignal(signo) == _signal.SIG_IGN


def signalfd(signals) -> int:
    """A non-blocking, close-on-exec signalfd for `signals` (which the caller must block)."""
    mask = 0
    for sig in signals:
        mask |= 1 << (int(sig) - 1)
    sigset = mask.to_bytes(_SIGSET_BYTES, "little")
    return _check(_libc.signalfd(-1, sigset, os.O_NONBLOCK | os.O_CLOEXEC))


def parse_signalfd_siginfo(raw: bytes) -> tuple[int, int, int]:
    """(signo, si_code, sender pid) from one struct signalfd_siginfo."""
    signo, _errno, code, pid = struct.unpack_from("IiiI", raw)
    return signo, code, pid


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [("next", ctypes.POINTER(_IfAddrs)), ("name", ctypes.c_char_p),
                     ("flags", ctypes.c_uint), ("addr", ctypes.c_void_p),
                     ("netmask", ctypes.c_void_p), ("broadaddr", ctypes.c_void_p),
                     ("data", ctypes.c_void_p)]


def set_cmdline(title: str) -> None:
    """What /proc/self/cmdline shows, for every process that can see us: `title` (its first
    word is the name, /proc/self/comm), written over our own argv area through
    /proc/self/mem (ours to write), the rest made NULs. A process forked from the monitor
    otherwise shows the monitor's command line: the interpreter's path, BBL's runtime
    directory, the user's id."""
    fd = os.open("/proc/self/stat", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fields = os.read(fd, 4096).rsplit(b")", 1)[1].split()
    finally:
        os.close(fd)
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    data = title.encode()[:max(end - start - 1, 0)]
    fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data + b"\0" * (end - start - len(data)), start)
    finally:
        os.close(fd)
    name = ctypes.create_string_buffer(title.split()[0].encode()[:15])
    prctl(PR_SET_NAME, ctypes.addressof(name))


def host_addresses() -> list[str]:
    """Every IPv4 and IPv6 address of every interface of our network namespace
    (getifaddrs(3)), loopback included."""
    import socket

    head = ctypes.POINTER(_IfAddrs)()
    _check(_libc.getifaddrs(ctypes.byref(head)))
    found = []
    try:
        entry = head
        while entry:
            addr = entry.contents.addr
            if addr:
                family = ctypes.c_ushort.from_address(addr).value
                if family == socket.AF_INET:
                    found.append(socket.inet_ntop(family, ctypes.string_at(addr + 4, 4)))
                elif family == socket.AF_INET6:
                    found.append(socket.inet_ntop(family, ctypes.string_at(addr + 8, 16)))
            entry = entry.contents.next
    finally:
        _libc.freeifaddrs(head)
    return found
