"""A new net namespace starts with `lo` down: its supervisor brings it up with one ioctl
(SIOCSIFFLAGS, what `ip link set lo up` amounts to) instead of a netlink library (importing
pyroute2 is slow and large, and every forked layer would carry it: docs/performance.md).
What a spec's `network` asks for beyond that is bbld/engine/netsetup.py's, imported only by
the instances that have one.
"""

import fcntl
import socket
import struct

from bbld.engine.errors import StartError

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: the name, then ifr_flags in the union (40 bytes)


def bring_up_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            request = struct.pack(_IFREQ, b"lo", 0)
            _, flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request))
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))
    except OSError as exc:
        raise StartError(f"bringing up the loopback interface: {exc.strerror}") from None
