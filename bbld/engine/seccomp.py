"""Named seccomp policies, written as data and compiled to classic BPF with libseccomp.

A policy is a list of named groups (below); a spec can extend or relax it by group name
(`seccomp = { policy = "default", relax = ["ptrace"] }`). Syscalls of other ABIs (i386 and
x32 on x86_64) hit libseccomp's bad-architecture action and kill the process.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

CLONE_NEWUSER = 0x10000000
# personality(2) flags that weaken exploit mitigations or change the address-space layout:
# ADDR_NO_RANDOMIZE, FDPIC_FUNCPTRS, MMAP_PAGE_ZERO, ADDR_COMPAT_LAYOUT, READ_IMPLIES_EXEC,
# ADDR_LIMIT_32BIT, SHORT_INODE, WHOLE_SECONDS, STICKY_TIMEOUTS, ADDR_LIMIT_3GB
PERSONALITY_FLAGS = (0x0040000, 0x0080000, 0x0100000, 0x0200000, 0x0400000, 0x0800000,
                     0x1000000, 0x2000000, 0x4000000, 0x8000000)

# Groups of syscalls denied with EPERM.
GROUPS: dict[str, tuple[str, ...]] = {
    "keyring": ("keyctl", "add_key", "request_key"),
    "kernel-modules": ("init_module", "finit_module", "delete_module"),
    "kexec": ("kexec_load", "kexec_file_load"),
    "kernel-tracing": ("perf_event_open", "bpf"),
    "userfaultfd": ("userfaultfd",),
    "file-handles": ("open_by_handle_at", "name_to_handle_at"),
    "mount": ("mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount",
              "fspick", "open_tree", "move_mount", "mount_setattr"),
    "ptrace": ("ptrace", "process_vm_readv", "process_vm_writev"),
    "namespace-join": ("setns",),
}
# Groups of ioctl requests denied with EPERM (compared on the low 32 bits only, so that high
# bits cannot slip past, CVE-2019-10063).
IOCTL_GROUPS: dict[str, tuple[int, ...]] = {
    "terminal-injection": (0x5412, 0x541C),  # TIOCSTI, TIOCLINUX
}
# Groups of (syscall, argument, mask, action): denied when the argument has the mask's bits.
FLAG_GROUPS: dict[str, tuple[tuple[str, int, int, str], ...]] = {
    # new user namespaces: unshare and clone say so in their flags; clone3 hides its flags in
    # memory a filter cannot read, so it answers ENOSYS and the C library falls back to clone
    "user-namespaces": (("unshare", 0, CLONE_NEWUSER, "EPERM"),
                        ("clone", 0, CLONE_NEWUSER, "EPERM"), ("clone3", 0, 0, "ENOSYS")),
    "personality": tuple(("personality", 0, flag, "EPERM") for flag in PERSONALITY_FLAGS),
}
# The policies, as lists of group names. Syscalls of other ABIs (i386 and x32 on x86_64)
# always hit libseccomp's bad-architecture action: the process is killed.
POLICIES: dict[str, tuple[str, ...]] = {
    "default": ("keyring", "kernel-modules", "kexec", "kernel-tracing", "userfaultfd",
                "file-handles", "terminal-injection", "mount", "ptrace", "namespace-join",
                "user-namespaces", "personality"),
    "no-terminal-injection": ("terminal-injection",),
}
ALL_GROUPS = (*GROUPS, *IOCTL_GROUPS, *FLAG_GROUPS)

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lib = None


def _libseccomp():
    global _lib
    if _lib is None:
        try:  # the soname, not ctypes.util.find_library (which runs ldconfig)
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError:
            raise OSError(errno.ENOENT, "libseccomp is not installed (Debian: libseccomp2)") \
                from None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _lib = lib
    return _lib


def groups_of(name: str, extend=(), relax=()) -> list[str]:
    """A policy's groups, with `extend` added and `relax` taken out."""
    return [g for g in (*POLICIES[name], *extend) if g not in relax]


def compile_policy(name: str, extend=(), relax=()) -> bytes:
    """The BPF program for a named policy (an array of 8-byte sock_filter). Remembered: a
    process that compiled it once (bbld's forker, at start) hands it to every fork."""
    return _compiled(name, tuple(extend), tuple(relax))


@functools.lru_cache(maxsize=32)
def _compiled(name: str, extend: tuple[str, ...], relax: tuple[str, ...]) -> bytes:
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        for group in dict.fromkeys(groups_of(name, extend, relax)):
            _add_group(lib, ctx, group)
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _add_group(lib, ctx, group: str) -> None:
    deny = _act_errno(errno.EPERM)
    for syscall in GROUPS.get(group, ()):
        _add(lib, ctx, deny, syscall)
    for request in IOCTL_GROUPS.get(group, ()):
        _add(lib, ctx, deny, "ioctl", (1, 0xFFFFFFFF, request))
    for syscall, argument, mask, action in FLAG_GROUPS.get(group, ()):
        act = _act_errno(getattr(errno, action))
        _add(lib, ctx, act, syscall, (argument, mask, mask) if mask else None)


def _add(lib, ctx, action: int, syscall: str, masked: tuple[int, int, int] | None = None):
    """Deny `syscall` (only when `(argument & mask) == value`, with `masked`)."""
    number = lib.seccomp_syscall_resolve_name(syscall.encode())
    if number < 0:  # unknown on this architecture: nothing to deny
        return
    if masked is None:
        _rule(lib.seccomp_rule_add_array(ctx, action, number, 0, None), syscall)
        return
    argument, mask, value = masked
    cmp = (_ArgCmp * 1)(_ArgCmp(argument, SCMP_CMP_MASKED_EQ, mask, value))
    _rule(lib.seccomp_rule_add_array(ctx, action, number, 1, cmp), syscall)


def _rule(result: int, syscall: str) -> None:
    if result < 0:
        raise OSError(-result, f"seccomp rule for {syscall}: {os.strerror(-result)}")


def _export(lib, ctx) -> bytes:
    fd = os.memfd_create("bbl-seccomp", os.MFD_CLOEXEC)
    try:
        result = lib.seccomp_export_bpf(ctx, fd)
        if result < 0:
            raise OSError(-result, f"seccomp_export_bpf: {os.strerror(-result)}")
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
