"""Messages over unix sockets: Varlink's framing (one JSON text and a NUL byte, Framer) and the
file descriptors that travel with messages (SCM_RIGHTS): the one place that builds and reads
the ancillary data, for every side (the client, bbld, the forker, the monitors, the engine's
supervisors). Imports only CPython's C modules, so the client stays light; the trio
side only awaits the trio socket's own methods, so nothing here imports trio.

The rules, the same everywhere: at most MAX_FDS fds with one message (each receiver may ask
for fewer); fds arrive close-on-exec; a message whose fds did not all fit (MSG_CTRUNC) is
refused (Truncated) and the fds that did arrive are closed, so nothing leaks either way.
"""

import os
import sys

try:
    import _socket as socket
except ImportError:  # not CPython
    import socket

MAX_FDS = 64  # file descriptors with one message, on any of BBL's sockets
_INT = 4  # sizeof(int): one fd in an SCM_RIGHTS record


class Address:
    """A socket's path as bind() and connect() can take it (`with Address(path) as address`):
    AF_UNIX addresses hold at most 107 bytes, so a longer path (a long XDG_RUNTIME_DIR) is
    reached through an O_PATH fd of its directory, /proc/self/fd/N/NAME, held meanwhile."""

    LIMIT = 107

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> str:
        if len(os.fsencode(self.path)) <= self.LIMIT:
            return self.path
        directory, name = os.path.split(self.path)
        self.fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self.fd}/{name}"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Truncated(ValueError):
    """More fds came with a message than the receiver takes; all of them were closed."""


def ancillary(fds) -> list:
    """sendmsg's ancillary data for `fds` (none for none)."""
    if not fds:
        return []
    record = b"".join(fd.to_bytes(_INT, sys.byteorder) for fd in fds)
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, record)]


def space(max_fds: int) -> int:
    """recvmsg's ancillary buffer size for up to `max_fds` fds."""
    return socket.CMSG_SPACE(max_fds * _INT)


def fds_of(ancdata, flags: int = 0) -> list[int]:
    """The fds a recvmsg brought. Raises Truncated (closing them) if some did not fit."""
    fds = []
    for level, kind, record in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(record) - len(record) % _INT
            fds += [int.from_bytes(record[i:i + _INT], sys.byteorder, signed=True)
                    for i in range(0, usable, _INT)]
    if flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise Truncated("more file descriptors than expected came with a message")
    return fds


def send(sock, data: bytes, fds=()) -> int:
    """One message (the fds with its first byte); returns the bytes sent (all of them on a
    datagram or SEQPACKET socket)."""
    return sock.sendmsg([data], ancillary(fds))


def send_all(sock, data: bytes, fds=()) -> None:
    """All of `data` on a stream socket, the fds with its first byte."""
    sent = send(sock, data, fds) if fds else 0
    view = memoryview(data)[sent:]
    while view:
        view = view[sock.send(view):]


def receive(sock, size: int, max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """Up to `size` bytes and the fds that came with them (close-on-exec)."""
    data, ancdata, flags, _ = sock.recvmsg(size, space(max_fds), socket.MSG_CMSG_CLOEXEC)
    return data, fds_of(ancdata, flags)


async def asend(sock, data: bytes, fds=()) -> None:
    """send() on a trio socket (a message: one sendmsg carries it all)."""
    await sock.sendmsg([data], ancillary(fds))


async def asend_all(sock, data: bytes, fds=()) -> None:
    """send_all() on a trio socket."""
    sent = await sock.sendmsg([data], ancillary(fds)) if fds else 0
    view = memoryview(data)[sent:]
    while view:
        view = view[await sock.send(view):]


async def areceive(sock, size: int, max_fds: int = MAX_FDS) -> tuple[bytes, list[int]]:
    """receive() on a trio socket."""
    data, ancdata, flags, _ = await sock.recvmsg(size, space(max_fds),
                                                 socket.MSG_CMSG_CLOEXEC)
    return data, fds_of(ancdata, flags)


class Messages:
    """Typed messages, each with its fds, read off a trio SEQPACKET socket until the other
    end hangs up: `decode` turns a message's bytes into its type (ValueError for anything
    else, which ends the stream too)."""

    def __init__(self, sock, decode, size: int, max_fds: int = MAX_FDS):
        self.sock, self.decode, self.size, self.max_fds = sock, decode, size, max_fds

    async def next(self):
        """(message, its fds: ours to close), or None once the peer hung up or said
        something that is not one."""
        try:
            data, fds = await areceive(self.sock, self.size, self.max_fds)
        except Truncated:
            return None
        if not data:
            return None
        try:
            return self.decode(data), fds
        except ValueError:
            close_all(fds)
            return None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------- Varlink's framing

MAX_MESSAGE = 1 << 20  # bytes; what bbld accepts in one message


class FrameTooLarge(Exception):
    pass


class Framer:
    """Splits a byte stream into NUL-terminated messages, refusing oversized ones."""

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while (end := self.buffer.find(b"\0")) >= 0:
            if end > self.limit:
                break
            frames.append(bytes(self.buffer[:end]))
            del self.buffer[:end + 1]
        if len(self.buffer) > self.limit:  # an oversized message, ended or not
            raise FrameTooLarge(f"message larger than {self.limit} bytes")
        return frames
