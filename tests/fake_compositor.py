"""A Wayland compositor of the tests' own, as small as the wire allows: it offers (or not)
wp_security_context_manager_v1, records what a sandbox engine registers, accepts the
sandbox's clients on the listening socket it was handed, and notices when it must stop
(the close fd hangs up). Real enough for bbld.wayland; nothing else of Wayland is there.

Each connection gets wl_display.sync answered and the registry's globals; clients that come
through a security context see no security-context manager (nested contexts are forbidden).
"""

from __future__ import annotations

import array
import os
import select
import socket
import struct
import threading

MANAGER = "wp_security_context_manager_v1"


class FakeCompositor:
    def __init__(self, path: str, offers_contexts: bool = True):
        self.offers = offers_contexts
        self.contexts: list[dict] = []  # engine, app_id, instance_id, committed, fds
        self.clients = {"main": 0, "sandboxed": 0}
        self.closed = threading.Event()  # a context's close fd hung up
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.server.bind(path)
        self.server.listen(16)
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(timeout=10)
        self.server.close()
        for context in self.contexts:
            for fd in context.get("fds", []):
                os.close(fd)
        os.close(self.stop_r)
        os.close(self.stop_w)

    # ---------------------------------------------------------------- the loop

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.stop_r, select.POLLIN)
        poller.register(self.server.fileno(), select.POLLIN)
        connections: dict[int, tuple[socket.socket, dict]] = {}
        listeners: dict[int, socket.socket] = {}
        closers: set[int] = set()
        while True:
            for fd, _ in poller.poll():
                if fd == self.stop_r:
                    for conn, _ in connections.values():
                        conn.close()
                    return
                if fd == self.server.fileno() or fd in listeners:
                    sandboxed = fd in listeners
                    conn, _ = (listeners[fd] if sandboxed else self.server).accept()
                    self.clients["sandboxed" if sandboxed else "main"] += 1
                    connections[conn.fileno()] = (conn, {"sandboxed": sandboxed,
                                                        "buffer": b"", "fds": []})
                    poller.register(conn.fileno(), select.POLLIN)
                elif fd in closers:  # the engine's end closed: stop listening there
                    poller.unregister(fd)
                    closers.discard(fd)
                    for listen_fd in list(listeners):
                        poller.unregister(listen_fd)
                        del listeners[listen_fd]
                    self.closed.set()
                else:
                    conn, state = connections[fd]
                    if not self._read(conn, state):
                        poller.unregister(fd)
                        del connections[fd]
                        conn.close()
                        continue
                    for listen_fd, close_fd in self._handle(conn, state):
                        listener = socket.socket(fileno=os.dup(listen_fd))
                        listeners[listener.fileno()] = listener
                        poller.register(listener.fileno(), select.POLLIN)
                        closers.add(close_fd)
                        poller.register(close_fd, 0)  # (POLLHUP is always reported)

    def _read(self, conn: socket.socket, state: dict) -> bool:
        fds = array.array("i")
        data, ancillary, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        state["buffer"] += data
        state["fds"] += list(fds)
        return bool(data)

    def _handle(self, conn: socket.socket, state: dict):
        """Each whole request in the buffer; yields (listen fd, close fd) of a committed
        context."""
        while len(state["buffer"]) >= 8:
            obj, word = struct.unpack_from("=II", state["buffer"])
            size, opcode = word >> 16, word & 0xFFFF
            if len(state["buffer"]) < size:
                return
            body, state["buffer"] = state["buffer"][8:size], state["buffer"][size:]
            yield from self._request(conn, state, obj, opcode, body)

    def _request(self, conn, state, obj, opcode, body):
        if obj == 1 and opcode == 1:  # wl_display.get_registry
            state["registry"], = struct.unpack("=I", body)
            offered = ["wl_compositor"] + ([MANAGER] if self.offers and not state["sandboxed"]
                                           else [])
            for name, interface in enumerate(offered, 1):
                _send(conn, state["registry"], 0, _uint(name) + _str(interface) + _uint(1))
        elif obj == 1 and opcode == 0:  # wl_display.sync
            callback, = struct.unpack("=I", body)
            _send(conn, callback, 0, _uint(0))
        elif obj == state.get("registry") and opcode == 0:  # wl_registry.bind
            interface, end = _string(body, 4)
            if interface == MANAGER:
                state["manager"] = struct.unpack_from("=I", body, end + 4)[0]
        elif obj == state.get("manager") and opcode == 1:  # create_listener
            context = {"id": struct.unpack("=I", body)[0], "fds": state["fds"][:2],
                       "committed": False}
            state["fds"] = state["fds"][2:]
            self.contexts.append(context)
        elif self.contexts and obj == self.contexts[-1]["id"]:
            context = self.contexts[-1]
            if opcode in (1, 2, 3):
                context[("engine", "app_id", "instance_id")[opcode - 1]] = _string(body, 0)[0]
            elif opcode == 4:
                context["committed"] = True
                yield tuple(context["fds"])


# (the wire's encoding written again, not taken from bbld.wayland: a mistake there must not
# be made on both ends of the test)


def _send(conn, obj: int, opcode: int, payload: bytes) -> None:
    conn.sendall(struct.pack("=II", obj, (8 + len(payload)) << 16 | opcode) + payload)


def _uint(value: int) -> bytes:
    return struct.pack("=I", value)


def _str(text: str) -> bytes:
    data = text.encode() + b"\0"
    return _uint(len(data)) + data + b"\0" * (-len(data) % 4)


def _string(body: bytes, offset: int) -> tuple[str, int]:
    length, = struct.unpack_from("=I", body, offset)
    start = offset + 4
    return body[start:start + length - 1].decode(), start + length + (-length % 4)
