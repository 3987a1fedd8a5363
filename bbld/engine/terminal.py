"""Terminals made inside a sandbox: a pty from the layer's own devpts, never the host's."""

from __future__ import annotations

import fcntl
import os

from bbld.engine import syscalls as sc
from bbld.engine.errors import EXIT_USAGE, StartError


def open_pty() -> tuple[int, int]:
    """(master, slave) of a new pty from /dev/ptmx as this process sees it."""
    try:
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise StartError(f"the layer has no usable /dev/ptmx ({exc.strerror}); give it a "
                         "dev or devpts operation", EXIT_USAGE) from None
    fcntl.ioctl(master, sc.TIOCSPTLCK, b"\0\0\0\0")  # unlock
    slave = fcntl.ioctl(master, sc.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    return master, slave


def take(slave: int) -> None:
    """In a new session's leader: `slave` becomes the controlling terminal and stdio."""
    fcntl.ioctl(slave, sc.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    if slave > 2:
        os.close(slave)
