"""Wayland's security context (wp_security_context_manager_v1), spoken on the wire.

A compositor that offers it can tell a sandbox's clients apart: a sandbox engine hands it a
listening socket of its own, tagged with the engine's name, the app's id and the instance's
id, and the app connects there instead of to the compositor's own socket (Flatpak does this;
docs/profiles.md, "Graphical apps"). The wire format is small enough to speak directly: a
message is the object's id, the size and opcode, then its arguments (32-bit words and
strings padded to 4 bytes); fds travel alongside (SCM_RIGHTS).

Run as a trusted helper of the instance (layer2a, `early`):

    python -I -m bbld.wayland COMPOSITOR SOCKET APP_ID INSTANCE_ID

makes SOCKET (listening), registers it with the compositor and holds the pipe whose end
tells the compositor to stop listening: the helper's end closes when the instance ends.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

MANAGER = "wp_security_context_manager_v1"
ENGINE = "io.bbl"  # the sandbox engine's name the compositor sees
DISPLAY = 1  # wl_display, the object every connection starts with
TIMEOUT = 5.0  # s a compositor has to answer


class WaylandError(OSError):
    """The compositor did not answer, or answered with a protocol error."""


class Connection:
    """A client connection: requests out, events in, one round trip at a time."""

    def __init__(self, path: str, timeout: float = TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.next_id, self.buffer, self.globals = 2, b"", {}
        self.registry = self.new_id()
        self.send(DISPLAY, 1, _uint(self.registry))  # wl_display.get_registry
        self.roundtrip()

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def send(self, obj: int, opcode: int, payload: bytes = b"", fds: tuple[int, ...] = ()):
        message = struct.pack("=II", obj, (8 + len(payload)) << 16 | opcode) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))]
        self.sock.sendmsg([message], ancillary if fds else [])

    def roundtrip(self) -> None:
        """Every event up to the answer of a wl_display.sync: globals recorded, a protocol
        error raised."""
        callback = self.new_id()
        self.send(DISPLAY, 0, _uint(callback))
        while True:
            obj, opcode, body = self._event()
            if obj == callback and opcode == 0:  # wl_callback.done
                return
            if obj == DISPLAY and opcode == 0:  # wl_display.error
                _, code = struct.unpack_from("=II", body)
                raise WaylandError(f"the compositor refused: {_string(body, 8)[0]} ({code})")
            if obj == self.registry and opcode == 0:  # wl_registry.global
                name, = struct.unpack_from("=I", body)
                interface, end = _string(body, 4)
                self.globals[interface] = (name, struct.unpack_from("=I", body, end)[0])

    def _event(self) -> tuple[int, int, bytes]:
        while len(self.buffer) < 8 or len(self.buffer) < struct.unpack_from(
                "=I", self.buffer, 4)[0] >> 16:
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise WaylandError("the compositor did not answer in time") from None
            if not chunk:
                raise WaylandError("the compositor closed the connection")
            self.buffer += chunk
        obj, word = struct.unpack_from("=II", self.buffer)
        size = word >> 16
        body, self.buffer = self.buffer[8:size], self.buffer[size:]
        return obj, word & 0xFFFF, body

    def bind(self, interface: str, version: int = 1) -> int:
        name, _ = self.globals[interface]
        obj = self.new_id()
        self.send(self.registry, 0, _uint(name) + _str(interface) + _uint(version) + _uint(obj))
        return obj

    def close(self) -> None:
        self.sock.close()


def offers_security_context(path: str, timeout: float = 2.0) -> bool:
    """Whether the compositor at `path` offers wp_security_context_manager_v1. OSError
    when it cannot be asked."""
    connection = Connection(path, timeout)
    try:
        return MANAGER in connection.globals
    finally:
        connection.close()


def register(compositor: str, listener: int, close_end: int, app_id: str,
             instance_id: str) -> None:
    """Hand `listener` (bound, listening) to the compositor as a security context with our
    metadata; it stops accepting there once the other end of `close_end` is closed."""
    connection = Connection(compositor)
    try:
        if MANAGER not in connection.globals:
            raise WaylandError(f"the compositor does not offer {MANAGER}")
        manager = connection.bind(MANAGER)
        context = connection.new_id()
        connection.send(manager, 1, _uint(context), fds=(listener, close_end))
        connection.send(context, 1, _str(ENGINE))
        connection.send(context, 2, _str(app_id))
        connection.send(context, 3, _str(instance_id))
        connection.send(context, 4)  # commit
        connection.send(context, 0)  # destroy: the listener stays (the protocol says so)
        connection.send(manager, 0)
        connection.roundtrip()  # (a refusal arrives before the answer)
    finally:
        connection.close()


def _uint(value: int) -> bytes:
    return struct.pack("=I", value)


def _str(text: str) -> bytes:
    data = text.encode() + b"\0"
    return _uint(len(data)) + data + b"\0" * (-len(data) % 4)


def _string(body: bytes, offset: int) -> tuple[str, int]:
    length, = struct.unpack_from("=I", body, offset)
    start = offset + 4
    return body[start:start + max(length - 1, 0)].decode(errors="replace"), \
        start + length + (-length % 4)


def main(argv: list[str]) -> int:
    compositor, path, app_id, instance_id = argv
    instance_id = os.environ.get("BBL_INSTANCE_ID") or instance_id
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path + ".new")  # (renamed once registered: the app waits for the name)
    listener.listen(128)
    close_end, _held = os.pipe2(os.O_CLOEXEC)
    try:
        register(compositor, listener.fileno(), close_end, app_id, instance_id)
    except OSError as exc:
        os.unlink(path + ".new")
        print(f"bbl wayland: {compositor}: {exc}", file=sys.stderr)
        return 1
    listener.close()
    os.close(close_end)
    os.rename(path + ".new", path)
    while True:  # holding the pipe's other end until the instance ends (and we with it)
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
