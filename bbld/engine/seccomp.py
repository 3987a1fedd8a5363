"""Named seccomp policies, written as data and compiled to classic BPF with libseccomp.

A policy is a list of named groups; each group denies its syscalls with EPERM (or, for
ioctls, denies specific request numbers, compared on the low 32 bits only so that high bits
cannot slip past, CVE-2019-10063). Syscalls of other ABIs (i386, x32 on x86_64) hit
libseccomp's bad-architecture action and kill the process.
"""

from __future__ import annotations

import ctypes
import errno
import os

GROUPS: dict[str, tuple[str, ...]] = {
    "keyring": ("keyctl", "add_key", "request_key"),
    "kernel-modules": ("init_module", "finit_module", "delete_module"),
    "kexec": ("kexec_load", "kexec_file_load"),
    "kernel-tracing": ("perf_event_open", "bpf"),
    "userfaultfd": ("userfaultfd",),
    "file-handles": ("open_by_handle_at",),
}
IOCTL_GROUPS: dict[str, tuple[int, ...]] = {
    "terminal-injection": (0x5412, 0x541C),  # TIOCSTI, TIOCLINUX
}
POLICIES: dict[str, tuple[str, ...]] = {
    "default": ("keyring", "kernel-modules", "kexec", "kernel-tracing", "userfaultfd",
                "file-handles", "terminal-injection"),
    "no-terminal-injection": ("terminal-injection",),
}

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


def compile_policy(name: str) -> bytes:
    """The BPF program for a named policy (an array of 8-byte sock_filter)."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        deny = _act_errno(errno.EPERM)
        for group in POLICIES[name]:
            for syscall in GROUPS.get(group, ()):
                number = lib.seccomp_syscall_resolve_name(syscall.encode())
                if number < 0:  # unknown on this architecture: nothing to deny
                    continue
                _rule(lib.seccomp_rule_add_array(ctx, deny, number, 0, None), syscall)
            for request in IOCTL_GROUPS.get(group, ()):
                cmp = (_ArgCmp * 1)(_ArgCmp(1, SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, request))
                number = lib.seccomp_syscall_resolve_name(b"ioctl")
                _rule(lib.seccomp_rule_add_array(ctx, deny, number, 1, cmp), "ioctl")
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


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
