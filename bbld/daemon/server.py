"""bbld's socket server (trio): peer checks, framing, dispatch of Varlink calls.

Every connection is served on its own; a bad message ends only that connection, and the daemon
goes on serving everyone else. Only the daemon's own uid may talk to it (SO_PEERCRED).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import resource
import secrets
import signal as _signal
import socket
import time
from array import array

import msgspec
import trio

from bbld import __version__, peer, profile, protocol, spec
from bbld.daemon import log
from bbld.daemon.forker_link import ForkerLink
from bbld.daemon.history import History
from bbld.daemon.registry import InstanceRecord, Registry, connect, replies
from bbld.messages import MAX_EXTRA_FDS, ControlRequest, StartRequest
from bbld.protocol import Call, Reply, VarlinkError

SERVICE = "org.varlink.service"
EVENT_BACKLOG = 256  # events a slow Events caller may fall behind by before it is dropped


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


class _Client:
    """One connection, as the limits see it."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.busy = False  # a call is being served
        self.since = trio.current_time()  # its last call's end
        self.held = 0  # bytes of an unfinished message
        self.scope = trio.CancelScope()  # cancelled to make room (Daemon._make_room)


class Daemon:
    def __init__(self, helper: "ForkerLink | None" = None, registry: Registry | None = None,
                 nursery: trio.Nursery | None = None, limits: Limits | None = None,
                 place: Place | None = None, quit: trio.CancelScope | None = None):
        self.helper = helper
        self.place = place
        self.quit_scope = quit  # cancelled by Quit: the daemon ends, its instances live on
        self.since = time.time()
        self.registry = registry
        self.nursery = nursery  # for tasks that outlive a call: following instances
        self.home = peer.own_namespaces()  # a caller must be in these (bbld.peer)
        self.limits = limits or Limits()
        if not self.limits.connections:
            self.limits.connections = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        self.clients: set[_Client] = set()
        self.buffered = 0  # bytes held in all unfinished messages
        self.refusing = 0
        self.methods = {
            f"{SERVICE}.GetInfo": self.get_info,
            f"{SERVICE}.GetInterfaceDescription": self.get_interface_description,
            "io.bbl.Manager.Ping": self.ping,
            "io.bbl.Manager.Status": self.status,
            "io.bbl.Manager.Quit": self.quit,
            "io.bbl.Manager.Run": self.run,
            "io.bbl.Manager.List": self.list,
            "io.bbl.Manager.Signal": self.signal,
            "io.bbl.Manager.Stop": self.stop,
            "io.bbl.Manager.Exec": self.exec,
            "io.bbl.Manager.SendArgs": self.send_args,
            "io.bbl.Manager.Events": self.events,
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

    async def status(self) -> dict:
        place = self.place
        return {"version": __version__, "pid": os.getpid(), "started": self.since,
                "started_by": place.started_by if place else "by hand",
                "socket": place.socket if place else "", "runtime": place.runtime if place
                else "", "instances": len(self.registry.live) if self.registry else 0,
                "ended": len(self.registry.ended) if self.registry else 0}

    async def quit(self) -> dict:
        """End the daemon after this reply; instances run on (their monitors hold them) and
        the next bbld adopts them."""
        if self.quit_scope is not None:
            self.nursery.start_soon(_cancel_soon, self.quit_scope)
        return {}

    async def run(self, spec: str = None, profile: str = None, tty: bool = False,
                  bwrap: list = None, prog: str = "bbl-bwrap", name: str = None,
                  args: list = (), env: dict = None, fd_numbers: list = (),
                  die_with_client: bool = False, detach: bool = False, *, fds: list[int],
                  on_client_gone: list):
        """Replies as they happen: started (more follow), then exited (the last)."""
        if len(fds) != 4 + len(fd_numbers) or len(fd_numbers) > MAX_EXTRA_FDS \
                or not all(isinstance(n, int) and 3 <= n < 1000 for n in fd_numbers):
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="fds")
        given = [key for key, value in (("spec", spec), ("profile", profile), ("bwrap", bwrap))
                 if value is not None]
        if len(given) != 1 or bwrap is not None and \
                not all(isinstance(word, str) for word in bwrap):
            raise VarlinkError(f"{SERVICE}.InvalidParameter",
                               parameter=given[-1] if given else "spec")
        if profile is not None:
            spec = await trio.to_thread.run_sync(_expand_profile, profile, env or {}, name, tty)
            name = None  # it named the profile's instance
        single = _single_instance_name(spec) if spec is not None else None
        running = await self.registry.running_single(single) if single else None
        if running is not None:  # hand the arguments over instead of starting a second one
            answered = False
            try:
                async for reply in self._forward(running, spec, list(args), fds[:3],
                                                 on_client_gone):
                    answered = True
                    yield reply
                return
            except VarlinkError as exc:
                if answered or exc.name != "io.bbl.Manager.NoSuchInstance":
                    raise
            # It ended before it could take them: this start makes a new one.
        record = InstanceRecord(id=secrets.token_hex(8), state="starting", started=time.time())
        record.name, record.single_instance = single, bool(single)
        self.registry.add(record)
        status, started, gone = None, False, False
        # A caller that leaves after the start (a detached start) stops only this stream; the
        # registry follows the instance on its own.
        followed = trio.CancelScope()

        def caller_left() -> None:
            nonlocal gone
            gone = True
            if started:
                followed.cancel()

        on_client_gone.append(caller_left)
        try:
            with followed:
                request = StartRequest(id=record.id, spec=spec or "", bwrap=bwrap, prog=prog,
                                       name=name, args=list(args), env=env or {},
                                       fd_numbers=list(fd_numbers), hold_tty=detach)
                async for event, layer_fds in self.helper.start(request, fds):
                    if event.event == "failed":
                        raise VarlinkError("io.bbl.Manager.StartFailed", message=event.message,
                                           exit_code=event.exit_code, reported=event.reported)
                    if event.event == "started":
                        started = True
                        tty = self._started(record, event, layer_fds)
                        if die_with_client or event.die_with_parent:  # for our caller
                            on_client_gone.insert(0, record.kill)
                        if gone:  # it left before the start was known (the command ran)
                            for callback in on_client_gone:
                                callback()
                        reply = Reply(parameters={"event": "started", "id": record.id,
                                                  "layers": event.layers,
                                                  "tty": tty is not None}, continues=True)
                        yield reply if tty is None else WithFds(reply, [tty])
                    elif event.event == "exited":
                        status = event.status
                        if started:  # (before the caller hears of it: ps then agrees)
                            self.registry.finish(record, status)
                        yield Reply(parameters={"event": "exited", "id": record.id,
                                                "status": status})
                        return
            if followed.cancelled_caught:
                return
            raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=1,
                               message="the instance's monitor ended without a status")
        finally:
            if not started:
                self.registry.drop(record)
            elif status is not None:
                self.registry.finish(record, status)

    run.takes_fds = True

    async def _forward(self, record: InstanceRecord, spec_text: str, args: list[str],
                       fds: list[int], on_client_gone: list):
        """A single-instance start that found its instance running: its main command's
        arguments go to that instance (events: forwarded, then exited)."""
        try:
            sandbox = spec.decode(spec_text, "json", "request")
            main = spec.path_to(sandbox.layer, spec.main_layer_name(sandbox))[-1]
            argv = main.command.argv[1:]
        except (spec.SpecError, ValueError, IndexError, AttributeError) as exc:
            problems = exc.problems if isinstance(exc, spec.SpecError) else [str(exc)]
            raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=2,
                               message="\n".join(problems)) from None
        request = ControlRequest(op="send-args", args=[*argv, *args])
        async for reply in self._exec_stream(record, request, fds, on_client_gone):
            if isinstance(reply, WithFds):  # (send-args has no terminal to pass)
                _close_all(reply.fds)
                reply = reply.reply
            if reply.parameters["event"] == "started":
                reply.parameters["event"] = "forwarded"
            yield reply

    def _started(self, record: InstanceRecord, event, fds: list[int]) -> int | None:
        """Record a start; returns the main command's pty master, if it came."""
        record.state, record.layers = "running", event.layers
        record.name, record.command = event.name, event.command
        record.pid, record.started = event.main_pid, event.started or record.started
        record.monitor = fds[0] if fds else None
        tty = fds[1] if event.tty and len(fds) == 2 else None
        _close_all([fd for fd in fds[1:] if fd != tty])
        self.registry.publish(record, "started")
        self.nursery.start_soon(self.registry.follow, record)
        return tty

    async def list(self, all: bool = False, brief: bool = False) -> dict:
        records = [*self.registry.ended] if all else []
        records += self.registry.live.values()
        return {"instances": [record.entry(brief) for record in records]}

    def _live(self, id: str) -> InstanceRecord:
        record = self.registry.find(id)
        if record is None or record.state != "running":
            raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=id)
        return record

    async def signal(self, id: str, signal: int, pid: int = None) -> dict:
        record = self._live(id)
        if not 1 <= signal <= 64:
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="signal")
        await self._control(record, ControlRequest(op="signal", signal=signal, pid=pid))
        return {}

    async def stop(self, id: str, timeout: float = 10.0) -> dict:
        """SIGTERM to the main command; SIGKILL to the whole tree after `timeout` seconds."""
        record = self._live(id)
        await self._control(record, ControlRequest(op="signal", signal=_signal.SIGTERM))
        with trio.move_on_after(max(0.0, timeout)):
            while record.state == "running":
                await self.registry.changed.wait()
        if record.state == "running":  # layer 1 killed: every layer below goes with it
            try:
                await self._control(record, ControlRequest(op="signal", signal=_signal.SIGKILL))
            except VarlinkError:
                pass  # its monitor is ending or gone: the registry hears of it all the same
            while record.state == "running":
                await self.registry.changed.wait()
        return {"status": record.status}

    async def _control(self, record: InstanceRecord, request: ControlRequest):
        """One request to the instance's monitor; its reply."""
        try:
            with await connect(self.registry.control_path(record.id), request) as sock:
                async for reply, fds in replies(sock):
                    _close_all(fds)
                    if reply.op == "error":
                        raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="pid"
                                           if request.pid is not None else "signal")
                    return reply
        except OSError:
            pass
        raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=record.id)

    async def exec(self, id: str, argv: list, layer: str = None, tty: bool = False, *,
                   fds: list[int], on_client_gone: list):
        """A command in a running layer: started (pid; the pty master with tty), exited."""
        record = self._live(id)
        if len(fds) != (0 if tty else 3) or not all(isinstance(a, str) for a in argv):
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="fds" if
                               len(fds) != (0 if tty else 3) else "argv")
        if tty and not argv:
            argv = spec.INTERACTIVE_SHELL
        request = ControlRequest(op="exec", argv=argv, layer=layer, tty=tty)
        async for reply in self._exec_stream(record, request, fds, on_client_gone):
            yield reply

    exec.takes_fds = True

    async def send_args(self, id: str, args: list, *, fds: list[int], on_client_gone: list):
        """Hand arguments to a running instance the way its spec says (see Exec's replies)."""
        record = self._live(id)
        if len(fds) != 3 or not all(isinstance(a, str) for a in args):
            raise VarlinkError(f"{SERVICE}.InvalidParameter",
                               parameter="fds" if len(fds) != 3 else "args")
        request = ControlRequest(op="send-args", args=args)
        async for reply in self._exec_stream(record, request, fds, on_client_gone):
            yield reply

    send_args.takes_fds = True

    async def events(self, *, on_client_gone: list):
        """Instances starting and ending, as they happen, until the caller hangs up."""
        send, receive = trio.open_memory_channel(EVENT_BACKLOG)
        self.registry.subscribers.add(send)
        on_client_gone.append(receive.close)
        try:
            async for event in receive:
                yield Reply(parameters=event, continues=True)
        except trio.ClosedResourceError:
            pass
        finally:
            self.registry.subscribers.discard(send)

    async def _exec_stream(self, record: InstanceRecord, request: ControlRequest,
                           fds: list[int], on_client_gone: list):
        try:
            sock = await connect(self.registry.control_path(record.id), request, fds)
        except OSError:
            raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=record.id) from None
        on_client_gone.append(sock.close)  # the monitor then kills what it started
        with sock:
            try:
                async for reply, reply_fds in replies(sock):
                    if reply.op == "error":
                        raise VarlinkError("io.bbl.Manager.ExecFailed", message=reply.message,
                                           exit_code=reply.exit_code or 1)
                    if reply.op == "started":
                        yield WithFds(Reply(parameters={"event": "started", "id": record.id,
                                                        "pid": reply.pid}, continues=True),
                                      reply_fds)
                    elif reply.op == "exited":
                        yield Reply(parameters={"event": "exited", "id": record.id,
                                                "status": reply.status})
                        return
            except (OSError, trio.ClosedResourceError):
                pass
        raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=record.id)

    # ------------------------------------------------------------ plumbing

    async def dispatch(self, call: Call, fds: list[int], on_client_gone: list | None = None):
        """Yield the replies to one call (one, or a stream for a `more` call)."""
        method = self.methods.get(call.method)
        if method is None:
            interface = call.method.rpartition(".")[0]
            if interface not in protocol.INTERFACES:
                yield VarlinkError(f"{SERVICE}.InterfaceNotFound", interface=interface).reply()
            else:
                yield VarlinkError(f"{SERVICE}.MethodNotFound", method=call.method).reply()
            return
        try:
            _check_parameters(method, call.parameters)
            if not inspect.isasyncgenfunction(method):
                yield Reply(parameters=await method(**call.parameters))
                return
            if not call.more:
                raise VarlinkError(f"{SERVICE}.ExpectedMore")
            kwargs = {}
            if getattr(method, "takes_fds", False):
                kwargs["fds"] = fds
            if _signature(method).parameters.get("on_client_gone"):
                kwargs["on_client_gone"] = on_client_gone if on_client_gone is not None else []
            async for reply in method(**call.parameters, **kwargs):  # streams yield Replies
                yield reply
        except VarlinkError as exc:
            yield exc.reply()
        except Exception as exc:  # noqa: BLE001 (a bug: every call gets an answer all the same)
            log.bug(call.method)
            yield VarlinkError("io.bbl.Manager.InternalError",
                               message=f"bbld failed to serve {call.method}: "
                                       f"{type(exc).__name__}; see its log").reply()

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
            await self._send(stream, error.reply())
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
                    _close_all(fds)
                    return
                if len(fds) > protocol.MAX_FDS:
                    raise protocol.InvalidMessage(
                        f"more than {protocol.MAX_FDS} file descriptors")
                calls = [protocol.decode_call(frame) for frame in framer.feed(data)]
                self._hold(client, len(framer.buffer))
                if not calls:
                    continue  # a call longer than one read: its fds wait for its end
                if fds and not (len(calls) == 1 and self._takes_fds(calls[0])):
                    raise protocol.InvalidMessage(
                        f"{len(fds)} file descriptor(s) sent with a call that takes none")
            except VarlinkError as exc:  # the stream is out of step: end it
                _close_all(fds)
                await self._send(stream, exc.reply())
                await _close_gently(stream)
                return
            client.busy = True
            for call in calls:
                on_client_gone: list = []
                async with trio.open_nursery() as nursery:
                    if call.more:  # a long call: notice when the caller goes away
                        nursery.start_soon(_watch_peer, stream.socket, on_client_gone)
                    try:
                        async for reply in self.dispatch(call, fds, on_client_gone):
                            if not call.oneway:
                                await self._send(stream, reply)
                    finally:
                        _close_all(fds)  # the helper has its own copies by now
                        fds = []
                        nursery.cancel_scope.cancel()
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

    def _takes_fds(self, call: Call) -> bool:
        return getattr(self.methods.get(call.method), "takes_fds", False)

    @staticmethod
    async def _send(stream: trio.SocketStream, reply: "Reply | WithFds") -> None:
        fds = []
        if isinstance(reply, WithFds):
            reply, fds = reply.reply, reply.fds
        try:
            data = protocol.encode(reply)
            if fds:  # replies are small: one sendmsg carries all of it
                await stream.socket.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                      array("i", fds))])
            else:
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            _close_all(fds)


class WithFds:
    """A reply that carries file descriptors (SCM_RIGHTS); they are closed once sent."""

    def __init__(self, reply: Reply, fds: list[int]):
        self.reply, self.fds = reply, fds


def _expand_profile(name_or_path: str, env: dict, name: str | None, tty: bool) -> str:
    """A profile's spec for Run (in a worker thread: it reads the user's files)."""
    try:
        if ("/" in name_or_path or name_or_path.endswith(".toml")) \
                and not os.path.isabs(name_or_path):  # ours is not the caller's directory
            raise profile.ProfileError([f"{name_or_path}: give the profile file's absolute "
                                        "path"])
        return profile.spec_for_start(name_or_path, env, name, tty)
    except profile.ProfileError as exc:
        raise VarlinkError("io.bbl.Manager.StartFailed", message="\n".join(exc.problems),
                           exit_code=2) from None


class _Naming(msgspec.Struct):
    """The two top-level keys of a spec the daemon looks at; the rest is skipped unread (the
    forker checks the whole spec)."""
    name: str = "sandbox"
    single_instance: bool = False


_naming = msgspec.json.Decoder(_Naming)


def _single_instance_name(text: str) -> str | None:
    """The spec's name if it asks for a single instance (not a spec: None; the forker says
    what is wrong with it)."""
    try:
        naming = _naming.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    return naming.name if naming.single_instance else None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def _receive(sock) -> tuple[bytes, list[int]]:
    """Bytes and any file descriptors that came with them (close-on-exec); a connection the
    peer reset ends as if it had hung up."""
    try:
        data, ancdata, flags, _ = await sock.recvmsg(
            65536, socket.CMSG_SPACE(protocol.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return b"", []
    fds = protocol.fds_from_ancillary(ancdata)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise protocol.InvalidMessage(f"more than {protocol.MAX_FDS} file descriptors")
    return data, fds


async def _watch_peer(sock, on_gone: list) -> None:
    """Run the callbacks in `on_gone` if the peer hangs up (EOF) while a call streams."""
    await trio.lowlevel.wait_readable(sock)
    try:
        if await sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
            return  # a pipelined call, not a hang-up: leave it for later
    except (BlockingIOError, OSError):
        pass
    for callback in on_gone:
        callback()


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


PARAMETER_TYPES = {"str": str, "list": list, "dict": dict, "int": int, "bool": bool,
                   "float": (int, float)}


@functools.cache
def _signature(method) -> inspect.Signature:
    """The method's signature, made once (inspect takes 50 us for each)."""
    return inspect.signature(method)


def _check_parameters(method, parameters: dict) -> None:
    """Every parameter known, every required one present, each of the annotated type."""
    signature = _signature(method)
    for name, value in parameters.items():
        expected = signature.parameters.get(name)
        kind = PARAMETER_TYPES.get(str(expected.annotation).partition("[")[0]) \
            if expected is not None else None
        if expected is None or expected.kind is inspect.Parameter.KEYWORD_ONLY \
                or (kind is not None and not isinstance(value, kind)):
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter=name)
    for name, expected in signature.parameters.items():
        if expected.default is inspect.Parameter.empty and name not in parameters \
                and expected.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter=name)


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.sleep(0.05)  # (the reply goes out first)
    scope.cancel()


async def serve(listener: trio.SocketListener, place: Place, ready=None,
                limits: Limits | None = None, quit: trio.CancelScope | None = None) -> None:
    """Serve until cancelled (or, with `quit`, until a Quit call cancels that scope).
    `ready` is called once the listener accepts connections."""
    async with trio.open_nursery() as nursery:
        history = History(place.history, place.runtime) if place.history else None
        registry = Registry(place.instances, history)
        await registry.adopt(nursery)
        daemon = Daemon(ForkerLink(place.instances), registry, nursery, limits, place, quit)
        if ready is not None:
            ready()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE, ENFILE, ENOMEM: try again soon, say it once
                log.say(f"cannot accept a connection: {exc.strerror}")
                await trio.sleep(0.1)
                continue
            nursery.start_soon(daemon.serve_connection, stream)
