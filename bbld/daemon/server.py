"""bbld's socket server (trio): who may talk (bbld.peer), the limits, Varlink's framing, and
the dispatch of each call to its method (bbld.daemon.methods).

Every connection is served on its own; a bad message ends only that connection, and the daemon
goes on serving everyone else. A connection's lifetime is a cancel scope: closing it to make
room, or the caller hanging up during a `more` call, cancels what serves it.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import socket

import msgspec
import trio

from bbld import channel, peer, protocol
from bbld.daemon import log
from bbld.daemon.forker_link import ForkerLink
from bbld.daemon.history import History
from bbld.daemon.methods import SERVICE, Daemon
from bbld.daemon.registry import Registry
from bbld.protocol import Reply, VarlinkError


@dataclasses.dataclass
class Place:
    """Where this bbld serves (bbld.daemon.main decides, and holds the directory's lock)."""
    runtime: str  # the runtime directory
    socket: str
    instances: str
    started_by: str = "by hand"  # "autostart", "socket activation"
    history: str | None = None  # the file ended instances are kept in (bbld.daemon.history)


@dataclasses.dataclass
class Limits:
    """What clients together can make bbld hold (docs/api.md, "Limits")."""
    buffered: int = 64 << 20  # bytes of unfinished messages, all connections together
    connections: int = 0  # open connections; 0: a quarter of bbld's fd limit, at least 64
    idle: float = 300.0  # seconds a connection may wait between calls
    frame: float = 10.0  # seconds a message may take from its first byte to its end
    refusing: int = 32  # refused peers still being told why (more are closed at once)


class Call:
    """One call being served: the fds that came with it, how to answer, and whether the
    caller is still there."""

    def __init__(self, stream: trio.SocketStream, call: protocol.Call, fds: list[int]):
        self.stream, self.oneway, self.fds = stream, call.oneway, fds
        self.gone = trio.Event()  # the caller hung up (watched during a `more` call)
        self.cancel_when_gone = True  # (a method may hold this off while it must finish)
        self.scope = trio.CancelScope()

    async def reply(self, parameters: dict, continues: bool = False, fds=()) -> None:
        """One reply; `fds` go with it (SCM_RIGHTS) and are closed here either way."""
        try:
            if not self.oneway:
                await _send(self.stream, Reply(parameters=parameters, continues=continues),
                            fds)
        finally:
            channel.close_all(fds)

    def caller_left(self) -> None:
        self.gone.set()
        if self.cancel_when_gone:
            self.scope.cancel()


class _Client:
    """One connection, as the limits see it."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.busy = False  # a call is being served
        self.since = trio.current_time()  # its last call's end
        self.held = 0  # bytes of an unfinished message
        self.scope = trio.CancelScope()  # cancelled to make room (Server._make_room)


class Server:
    def __init__(self, daemon: Daemon, limits: Limits | None = None):
        self.daemon = daemon
        self.home = peer.own_namespaces()  # a caller must be in these (bbld.peer)
        self.limits = limits or Limits()
        if not self.limits.connections:
            self.limits.connections = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self.clients: set[_Client] = set()
        self.buffered = 0  # bytes held in all unfinished messages
        self.refusing = 0

    # ------------------------------------------------------------ connections

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """One client. A bug while serving it ends this connection, never the daemon."""
        try:
            async with stream:
                try:
                    peer.check(stream.socket, self.home)
                except peer.Refused as refused:
                    await self._refuse(stream, VarlinkError(
                        "io.bbl.Manager.PermissionDenied", uid=refused.uid,
                        sandboxed=refused.sandboxed, reason=refused.reason))
                    return
                if len(self.clients) >= self.limits.connections and not self._make_room():
                    await self._refuse(stream, VarlinkError(
                        "io.bbl.Manager.Busy", reason=f"bbld serves {len(self.clients)} "
                        "connections with a call in progress, its limit; try again later"))
                    return
                client = _Client(stream)
                self.clients.add(client)
                try:
                    with client.scope:
                        await self._serve(client)
                finally:
                    self.clients.discard(client)
                    self.buffered -= client.held
        except Exception:  # noqa: BLE001 (a bug: said in the log, the daemon goes on)
            log.bug("serving a connection")

    async def _refuse(self, stream: trio.SocketStream, error: VarlinkError) -> None:
        """One error reply, then the end; a flood of refused peers is cut off sooner."""
        if self.refusing >= self.limits.refusing:
            return
        self.refusing += 1
        try:
            await _send(stream, error.reply())
            await _close_gently(stream)
        finally:
            self.refusing -= 1

    def _make_room(self) -> bool:
        """Close the connection that has waited longest between calls; False if every
        connection has a call in progress."""
        waiting = [client for client in self.clients if not client.busy]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda client: client.since)
        oldest.scope.cancel()
        self.clients.discard(oldest)
        return True

    async def _serve(self, client: _Client) -> None:
        stream = client.stream
        framer = protocol.Framer()
        fds: list[int] = []  # they come with a call's first bytes, kept until its end
        while True:
            try:
                data, more_fds = await self._next_bytes(client, framer)
                fds += more_fds
                if not data:
                    channel.close_all(fds)
                    return
                if len(fds) > channel.MAX_FDS:  # (over several reads of one call)
                    raise protocol.InvalidMessage(
                        f"more than {channel.MAX_FDS} file descriptors")
                calls = [protocol.decode_call(frame) for frame in framer.feed(data)]
                self._hold(client, len(framer.buffer))
                if not calls:
                    continue  # a call longer than one read: its fds wait for its end
                if fds and not (len(calls) == 1 and self._takes_fds(calls[0])):
                    raise protocol.InvalidMessage(
                        f"{len(fds)} file descriptor(s) sent with a call that takes none")
            except VarlinkError as exc:  # the stream is out of step: end it
                channel.close_all(fds)
                await _send(stream, exc.reply())
                await _close_gently(stream)
                return
            client.busy = True
            for message in calls:
                call = Call(stream, message, fds)
                fds = []
                try:
                    await self._serve_call(message, call)
                finally:
                    channel.close_all(call.fds)  # (the forker has its own copies by now)
            client.busy, client.since = False, trio.current_time()

    async def _next_bytes(self, client: _Client, framer) -> tuple[bytes, list[int]]:
        """The next bytes (and fds) from the client, b"" at its end; a connection that waits
        too long between calls ends quietly, a message too slow in coming with an error."""
        partial = bool(framer.buffer)
        with trio.move_on_after(self.limits.frame if partial else self.limits.idle):
            return await _receive(client.stream.socket)
        if partial:
            raise protocol.InvalidMessage(f"a message took longer than {self.limits.frame:g} "
                                          "s to arrive")
        return b"", []

    def _hold(self, client: _Client, held: int) -> None:
        """Account for the client's unfinished message against the budget of all."""
        self.buffered += held - client.held
        client.held = held
        if self.buffered > self.limits.buffered:
            raise protocol.InvalidMessage("bbld holds too many unfinished messages of its "
                                          "clients; send whole messages, and fewer at once")

    def _takes_fds(self, message: protocol.Call) -> bool:
        return self.daemon.methods.get(message.method, (None, None, False))[2]

    # ------------------------------------------------------------ calls

    async def _serve_call(self, message: protocol.Call, call: Call) -> None:
        """Check the call, run its method, and send what it returns (or the error). A
        `more` call is watched: when the caller hangs up, Call.caller_left."""
        async with trio.open_nursery() as nursery:
            if message.more:
                nursery.start_soon(_watch_peer, call.stream.socket, call.caller_left)
            with call.scope:
                try:
                    await self.dispatch(message, call)
                except VarlinkError as exc:
                    if not call.oneway:
                        await _send(call.stream, exc.reply())
            nursery.cancel_scope.cancel()

    async def dispatch(self, message: protocol.Call, call: Call) -> None:
        found = self.daemon.methods.get(message.method)
        if found is None:
            interface = message.method.rpartition(".")[0]
            if interface not in protocol.INTERFACES:
                raise VarlinkError(f"{SERVICE}.InterfaceNotFound", interface=interface)
            raise VarlinkError(f"{SERVICE}.MethodNotFound", method=message.method)
        method, params_type, _takes_fds = found
        params = check_parameters(message.parameters, params_type)
        streams = message.method in self.daemon.streams
        if streams and not message.more:
            raise VarlinkError(f"{SERVICE}.ExpectedMore")
        try:
            result = await method(params, call)
        except (VarlinkError, trio.Cancelled):
            raise
        except Exception as exc:  # noqa: BLE001 (a bug: every call gets an answer all the same)
            log.bug(message.method)
            raise VarlinkError("io.bbl.Manager.InternalError",
                               message=f"bbld failed to serve {message.method}: "
                                       f"{type(exc).__name__}; see its log") from None
        if not streams:
            await call.reply(result)


def check_parameters(parameters: dict, params_type):
    """The call's parameters as the method's Struct; InvalidParameter names the first one
    that is unknown, missing or of the wrong type (null is fine for `?type`)."""
    try:
        return msgspec.convert(parameters, params_type)
    except msgspec.ValidationError as exc:
        found = _PARAMETER.search(str(exc))
        raise VarlinkError(f"{SERVICE}.InvalidParameter",
                           parameter=(found[1] or found[2]) if found else "") from None


# msgspec's words: "... - at `$.name[0]`", "unknown field `name`", "required field `name`"
_PARAMETER = re.compile(r"`\$\.(\w+)|field `(\w+)`")


async def _send(stream: trio.SocketStream, reply: Reply, fds=()) -> None:
    """One reply; a caller that has gone away is not an error."""
    try:
        await channel.asend_all(stream.socket, protocol.encode(reply), fds)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _receive(sock) -> tuple[bytes, list[int]]:
    """Bytes and any file descriptors that came with them (close-on-exec); a connection the
    peer reset ends as if it had hung up."""
    try:
        return await channel.areceive(sock, 65536)
    except channel.Truncated as exc:
        raise protocol.InvalidMessage(str(exc)) from None
    except OSError:
        return b"", []


async def _watch_peer(sock, caller_left) -> None:
    """Say so if the peer hangs up (EOF) while a call streams."""
    await trio.lowlevel.wait_readable(sock)
    try:
        if await sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
            return  # a pipelined call, not a hang-up: leave it for later
    except (BlockingIOError, OSError):
        pass
    caller_left()


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


async def serve(listener: trio.SocketListener, place: Place, ready=None,
                limits: Limits | None = None, quit: trio.CancelScope | None = None) -> None:
    """Serve until cancelled (or, with `quit`, until a Quit call cancels that scope).
    `ready` is called once the listener accepts connections."""
    async with trio.open_nursery() as nursery:
        history = History(place.history, place.runtime) if place.history else None
        registry = Registry(place.instances, history)
        await registry.adopt(nursery)
        daemon = Daemon(ForkerLink(place.instances), registry, nursery, place, quit)
        server = Server(daemon, limits)
        if ready is not None:
            ready()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE, ENFILE, ENOMEM: try again soon, say it once
                log.say(f"cannot accept a connection: {exc.strerror}")
                await trio.sleep(0.1)
                continue
            nursery.start_soon(server.serve_connection, stream)
