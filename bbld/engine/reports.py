"""What layers tell the engine's caller while an instance starts.

Every layer supervisor shares one end of a SOCK_SEQPACKET socketpair; the caller holds the
other. A report is a small msgspec-encoded message; `Built` carries a pidfd of the reporting
supervisor (SCM_RIGHTS), so the caller identifies it without trusting a pid number. Reports
are data: the receiver checks the layer name and the message type, and nothing else.
"""

from __future__ import annotations

import os
import socket
from array import array

import msgspec

MAX_REPORT = 4096
MAX_REPORT_FDS = 16


class Built(msgspec.Struct, tag=True):
    """The layer's namespaces and filesystem are ready; its sub-layers are being built.

    Sent with the supervisor's pidfd, then one fd per name in `namespace_fds`, opened from
    /proc/self/ns by the supervisor itself: the caller can enter the layer later (exec,
    attach) although the supervisor is not dumpable. A layer built by its parent's process
    (LayerPlan.inline) has no process: no pidfd."""
    layer: str
    namespaces: dict[str, int]
    namespace_fds: list[str] = []
    process: bool = True


class Running(msgspec.Struct, tag=True):
    """The layer's commands have been executed."""
    layer: str


class Failed(msgspec.Struct, tag=True):
    layer: str
    message: str
    exit_code: int = 1


class MainEnded(msgspec.Struct, tag=True):
    """The instance's main command has ended with `status`: the whole tree ends with it.
    Said at once, so the caller need not wait for every layer to end in turn."""
    layer: str
    status: int


Report = Built | Running | Failed | MainEnded
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Report)


def send(sock: socket.socket, report: Report, fds: tuple[int, ...] = ()) -> None:
    data = _encoder.encode(report)[:MAX_REPORT]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def receive(sock: socket.socket) -> tuple[Report | None, list[int]]:
    """One report (None at end of stream). Raises ValueError for malformed data."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REPORT, MAX_REPORT_FDS,
                                                socket.MSG_CMSG_CLOEXEC)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        return _decoder.decode(data), fds
    except msgspec.DecodeError as exc:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"unreadable report: {exc}") from None
