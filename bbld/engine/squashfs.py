"""Squashfs images (AppImages) mounted read-only through FUSE, served by squashfuse.

The layer's supervisor opens /dev/fuse in the parent's view, mounts a FUSE filesystem on that
connection itself (so no setuid fusermount is needed), and starts squashfuse to serve it:
chrooted into the parent's view (where squashfuse and its libraries live), with no
capabilities and no_new_privs, since it parses an untrusted image. squashfuse is given the
mount as `/dev/fd/N` (libfuse >= 3.3) and dies with the layer.
"""

from __future__ import annotations

import os
import signal
import struct

from bbld.engine import privileges
from bbld.engine import syscalls as sc
from bbld.engine.errors import EXIT_USAGE, StartError

SQUASHFS_MAGIC = b"hsqs"
SQUASHFUSE = ("/usr/bin/squashfuse", "/usr/local/bin/squashfuse", "/bin/squashfuse")


def image_offset(fd: int) -> int:
    """Where the squashfs starts: 0 for a plain image; after the ELF part of an AppImage
    (the end of its section header table). Raises StartError if there is none."""
    if os.pread(fd, 4, 0) == SQUASHFS_MAGIC:
        return 0
    header = os.pread(fd, 64, 0)
    if len(header) < 52 or header[:4] != b"\x7fELF" or header[4] not in (1, 2) \
            or header[5] not in (1, 2):
        raise StartError("neither a squashfs image nor an ELF file (an AppImage)", EXIT_USAGE)
    order = "<" if header[5] == 1 else ">"
    if header[4] == 2:  # 64-bit
        (shoff,) = struct.unpack_from(order + "Q", header, 0x28)
        shentsize, shnum = struct.unpack_from(order + "HH", header, 0x3A)
    else:
        (shoff,) = struct.unpack_from(order + "I", header, 0x20)
        shentsize, shnum = struct.unpack_from(order + "HH", header, 0x2E)
    offset = shoff + shentsize * shnum
    if os.pread(fd, 4, offset) != SQUASHFS_MAGIC:
        raise StartError(f"no squashfs image after the ELF part (at byte {offset}); is it a "
                         "type 2 AppImage?", EXIT_USAGE)
    return offset


def open_fuse(old_root: int) -> int:
    try:
        return os.open("dev/fuse", os.O_RDWR | os.O_CLOEXEC, dir_fd=old_root)
    except OSError as exc:
        raise StartError(f"cannot open /dev/fuse ({exc.strerror}): mounting an AppImage needs "
                         "FUSE; make /dev/fuse usable (mode 0666, as desktop systems ship it)",
                         EXIT_USAGE) from None


def new_mount(fuse: int) -> int:
    """A detached read-only FUSE mount on the connection `fuse`."""
    return sc.fsmount_new("fuse", {"fd": str(fuse), "rootmode": "40000",
                                   "user_id": str(os.getuid()), "group_id": str(os.getgid()),
                                   "allow_other": None, "default_permissions": None},
                          sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV)


def serve(old_root: int, image: str, offset: int, fuse: int) -> int:
    """Start squashfuse for the mount on `fuse`; returns its pid."""
    program = next((p for p in SQUASHFUSE if _exists(old_root, p)), None)
    if program is None:
        raise StartError("squashfuse is not installed (Debian: apt install squashfuse); it "
                         "serves AppImage mounts", EXIT_USAGE)
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        sc.set_signal_mask(signal.SIG_SETMASK, [])
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.fchdir(old_root)
        os.chroot(".")
        os.dup2(fuse, 3, inheritable=True)
        sc.close_all_fds_except({0, 1, 2, 3})
        privileges.restrict_capabilities(frozenset(), privileges.cap_last())
        privileges.no_new_privs()
        os.execv(program, [program, "-f", "-o", f"offset={offset}", image, "/dev/fd/3"])
    finally:
        os._exit(127)


def _exists(root: int, path: str) -> bool:
    try:
        os.stat(path.lstrip("/"), dir_fd=root)
        return True
    except OSError:
        return False

