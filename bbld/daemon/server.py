"""bbld's socket server (trio): peer checks, framing, dispatch of Varlink calls.

Every connection is served on its own; a bad message ends only that connection, and the daemon
goes on serving everyone else. Only the daemon's own uid may talk to it (SO_PEERCRED).
"""

from __future__ import annotations

import inspect
import os
import socket
import struct

import trio

from bbld import __version__, protocol
from bbld.protocol import Call, Reply, VarlinkError

SERVICE = "org.varlink.service"


def peer_uid(sock: trio.socket.SocketType) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return uid


class Daemon:
    def __init__(self):
        self.methods = {
            f"{SERVICE}.GetInfo": self.get_info,
            f"{SERVICE}.GetInterfaceDescription": self.get_interface_description,
            "io.bbl.Manager.Ping": self.ping,
        }

    # ------------------------------------------------------------ methods

    async def get_info(self) -> dict:
        return {"vendor": protocol.VENDOR, "product": protocol.PRODUCT, "version": __version__,
                "url": protocol.URL, "interfaces": list(protocol.INTERFACES)}

    async def get_interface_description(self, interface: str) -> dict:
        if interface not in protocol.INTERFACES:
            raise VarlinkError(f"{SERVICE}.InterfaceNotFound", interface=interface)
        return {"description": protocol.INTERFACES[interface]}

    async def ping(self) -> dict:
        return {"version": __version__, "pid": os.getpid()}

    # ------------------------------------------------------------ plumbing

    async def dispatch(self, call: Call) -> Reply:
        method = self.methods.get(call.method)
        if method is None:
            interface = call.method.rpartition(".")[0]
            if interface not in protocol.INTERFACES:
                return VarlinkError(f"{SERVICE}.InterfaceNotFound", interface=interface).reply()
            return VarlinkError(f"{SERVICE}.MethodNotFound", method=call.method).reply()
        try:
            _check_parameters(method, call.parameters)
            return Reply(parameters=await method(**call.parameters))
        except VarlinkError as exc:
            return exc.reply()

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            uid = peer_uid(stream.socket)
            if uid != os.getuid():
                await self._send(stream, VarlinkError("io.bbl.Manager.PermissionDenied",
                                                      uid=uid).reply())
                await _close_gently(stream)
                return
            framer = protocol.Framer()
            while True:
                try:
                    data, fds = await _receive(stream.socket)
                    for fd in fds:  # no method takes file descriptors yet: keep none
                        os.close(fd)
                    if fds:
                        raise protocol.InvalidMessage(
                            f"{len(fds)} file descriptor(s) sent with a call that takes none")
                    if not data:
                        return
                    calls = [protocol.decode_call(frame) for frame in framer.feed(data)]
                except VarlinkError as exc:  # the stream is out of step: end it
                    await self._send(stream, exc.reply())
                    await _close_gently(stream)
                    return
                for call in calls:
                    reply = await self.dispatch(call)
                    if not call.oneway:
                        await self._send(stream, reply)

    @staticmethod
    async def _send(stream: trio.SocketStream, reply: Reply) -> None:
        try:
            await stream.send_all(protocol.encode(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _receive(sock) -> tuple[bytes, list[int]]:
    """Bytes and any file descriptors that came with them (close-on-exec)."""
    data, ancdata, flags, _ = await sock.recvmsg(
        65536, socket.CMSG_SPACE(protocol.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds = protocol.fds_from_ancillary(ancdata)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise protocol.InvalidMessage(f"more than {protocol.MAX_FDS} file descriptors")
    return data, fds


async def _close_gently(stream: trio.SocketStream) -> None:
    """Close after an error reply without resetting: unread input would make the kernel send
    RST, and the peer could lose the reply. Discard input for at most a second."""
    try:
        await stream.send_eof()
        with trio.move_on_after(1):
            while await stream.receive_some(65536):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _check_parameters(method, parameters: dict) -> None:
    """Every parameter known, every required one present, each of the annotated type."""
    signature = inspect.signature(method)
    for name, value in parameters.items():
        expected = signature.parameters.get(name)
        if expected is None or (expected.annotation == "str" and not isinstance(value, str)):
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter=name)
    for name, expected in signature.parameters.items():
        if expected.default is inspect.Parameter.empty and name not in parameters:
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter=name)


async def serve(listener: trio.SocketListener, ready=None) -> None:
    """Serve until cancelled. `ready` is called once the listener accepts connections."""
    daemon = Daemon()
    async with trio.open_nursery() as nursery:
        if ready is not None:
            ready()
        await trio.serve_listeners(daemon.serve_connection, [listener],
                                   handler_nursery=nursery)
