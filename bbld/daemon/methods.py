"""The io.bbl.Manager methods (trio, in bbld's process): what each call does, with its
parameters as one msgspec Struct per method, as the interface (bbld.protocol) declares them
(`?type` is `type | None`: an explicit null is the same as leaving it out).

A method gets its checked parameters and the Call being served (bbld.daemon.server): its fds,
`reply()`, and whether the caller is still there (`gone`; for a `more` call the server
cancels the method when the caller hangs up, unless the method is still starting an
instance, which must not be lost: Call.cancel_when_gone). A method returns the reply's
parameters, or sends its replies itself (streams) and returns None.
"""

from __future__ import annotations

import os
import secrets
import signal as _signal
import time

import msgspec
import trio

from bbld import __version__, cgroupfs, channel, profile, protocol, spec
from bbld.daemon.registry import Ambiguous, InstanceRecord, call_monitor
from bbld.messages import MAX_EXTRA_FDS, ControlRequest, StartRequest
from bbld.protocol import VarlinkError

SERVICE = "org.varlink.service"
EVENT_BACKLOG = 256  # events a slow Events caller may fall behind by before it is dropped


class Params(msgspec.Struct, forbid_unknown_fields=True):
    pass


class NoParams(Params):
    pass


class InterfaceParams(Params):
    interface: str


class RunParams(Params):
    args: list[str]
    env: dict[str, str]
    spec: str | None = None
    profile: str | None = None
    tty: bool | None = None
    bwrap: list[str] | None = None
    prog: str | None = None
    name: str | None = None
    fd_numbers: list[int] | None = None
    die_with_client: bool | None = None
    detach: bool | None = None


class ListParams(Params):
    all: bool | None = None
    brief: bool | None = None
    id: str | None = None


class SignalParams(Params):
    id: str
    signal: int
    pid: int | None = None


class StopParams(Params):
    id: str
    timeout: float | None = None


class ExecParams(Params):
    id: str
    argv: list[str]
    layer: str | None = None
    tty: bool | None = None


class AttachParams(Params):
    id: str


class SendArgsParams(Params):
    id: str
    args: list[str]


class Daemon:
    """The methods, and what they share: the registry, the link to the forker, the place."""

    def __init__(self, forker=None, registry=None, nursery: trio.Nursery | None = None,
                 place=None, quit: trio.CancelScope | None = None):
        self.forker = forker
        self.registry = registry
        self.nursery = nursery  # for tasks that outlive a call: following instances
        self.place = place
        self.quit_scope = quit  # cancelled by Quit: the daemon ends, its instances live on
        self.since = time.time()
        # name -> (method, its parameters, whether fds may come with the call)
        self.methods = {
            f"{SERVICE}.GetInfo": (self.get_info, NoParams, False),
            f"{SERVICE}.GetInterfaceDescription": (self.get_interface_description,
                                                   InterfaceParams, False),
            "io.bbl.Manager.Ping": (self.ping, NoParams, False),
            "io.bbl.Manager.Status": (self.status, NoParams, False),
            "io.bbl.Manager.Quit": (self.quit, NoParams, False),
            "io.bbl.Manager.Run": (self.run, RunParams, True),
            "io.bbl.Manager.List": (self.list, ListParams, False),
            "io.bbl.Manager.Signal": (self.signal, SignalParams, False),
            "io.bbl.Manager.Stop": (self.stop, StopParams, False),
            "io.bbl.Manager.Exec": (self.exec, ExecParams, True),
            "io.bbl.Manager.SendArgs": (self.send_args, SendArgsParams, True),
            "io.bbl.Manager.Attach": (self.attach, AttachParams, False),
            "io.bbl.Manager.Events": (self.events, NoParams, False),
        }
        self.streams = {"io.bbl.Manager.Run", "io.bbl.Manager.Exec", "io.bbl.Manager.Attach",
                        "io.bbl.Manager.SendArgs", "io.bbl.Manager.Events"}

    # ------------------------------------------------------------ about the daemon

    async def get_info(self, p: NoParams, call) -> dict:
        return {"vendor": protocol.VENDOR, "product": protocol.PRODUCT, "version": __version__,
                "url": protocol.URL, "interfaces": list(protocol.INTERFACES)}

    async def get_interface_description(self, p: InterfaceParams, call) -> dict:
        if p.interface not in protocol.INTERFACES:
            raise VarlinkError(f"{SERVICE}.InterfaceNotFound", interface=p.interface)
        return {"description": protocol.INTERFACES[p.interface]}

    async def ping(self, p: NoParams, call) -> dict:
        return {"version": __version__, "pid": os.getpid()}

    async def status(self, p: NoParams, call) -> dict:
        place = self.place
        return {"version": __version__, "pid": os.getpid(), "started": self.since,
                "started_by": place.started_by if place else "by hand",
                "socket": place.socket if place else "",
                "runtime": place.runtime if place else "",
                "instances": len(self.registry.live), "ended": len(self.registry.ended),
                "watchers": len(self.registry.subscribers), **_cgroup()}

    async def quit(self, p: NoParams, call) -> dict:
        """End the daemon after this reply; instances run on (their monitors hold them) and
        the next bbld adopts them."""
        if self.quit_scope is not None:
            self.nursery.start_soon(_cancel_soon, self.quit_scope)
        return {}

    # ------------------------------------------------------------ Run

    async def run(self, p: RunParams, call) -> None:
        """Replies as they happen: started (more follow), then exited (the last); or, for a
        single instance that runs already, forwarded, then exited."""
        call.cancel_when_gone = False  # (until the instance is known: it must not be lost)
        spec_text, name, notices = await self._resolve(p, call.fds)
        single = _single_instance_name(spec_text) if spec_text else None
        running = await self.registry.running_single(single) if single else None
        if running is not None and await self._forward(running, spec_text, p.args, call,
                                                       p.profile is not None):
            return
        await self._start(p, spec_text, name, single, call, notices)

    async def _resolve(self, p: RunParams, fds: list[int]) \
            -> tuple[str | None, str | None, list[str]]:
        """The spec to start (JSON; None for a bubblewrap command line), the name, and the
        profile's notices."""
        numbers = p.fd_numbers or []
        if len(fds) != 4 + len(numbers) or len(numbers) > MAX_EXTRA_FDS \
                or not all(3 <= n < 1000 for n in numbers):
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="fds")
        given = [key for key in ("spec", "profile", "bwrap") if getattr(p, key) is not None]
        if len(given) != 1:
            raise VarlinkError(f"{SERVICE}.InvalidParameter",
                               parameter=given[-1] if given else "spec")
        if p.profile is None:
            return p.spec, p.name, []
        notices: list[str] = []
        expanded = await trio.to_thread.run_sync(_expand_profile, p.profile, p.env, p.name,
                                                 bool(p.tty), notices)
        return expanded, None, notices  # (the name went into the profile's spec)

    async def _forward(self, record: InstanceRecord, spec_text: str, args: list[str],
                       call, profile: bool) -> bool:
        """Hand a single-instance start's arguments to its running instance (events:
        forwarded, then exited). False if that instance ended before it could take them:
        then this start makes a new one. A profile's start hands over its new arguments
        alone, as `send-args` does (its command's own arguments are the running app's
        already); a spec's, its command's arguments too (they are that start's)."""
        try:
            sandbox = spec.decode(spec_text, "json", "request")
            main = spec.path_to(sandbox.layer, spec.main_layer_name(sandbox))[-1]
            argv = [] if profile else main.command.argv[1:]
        except (spec.SpecError, ValueError, IndexError, AttributeError) as exc:
            problems = exc.problems if isinstance(exc, spec.SpecError) else [str(exc)]
            raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=2,
                               message="\n".join(problems)) from None
        request = ControlRequest(op="send-args", args=[*argv, *args])
        try:
            monitor = await call_monitor(self.registry.control_path(record.id), request,
                                             call.fds[:3])
        except OSError:
            return False
        call.cancel_when_gone = True
        with monitor:
            await self._relay_exec(record, monitor, call, started_as="forwarded")
        return True

    async def _start(self, p: RunParams, spec_text: str | None, name: str | None,
                     single: str | None, call, notices: list[str]) -> None:
        record = InstanceRecord(id=secrets.token_hex(8), state="starting", started=time.time())
        record.name, record.single_instance = single, bool(single)
        self.registry.add(record)
        request = StartRequest(id=record.id, spec=spec_text or "", bwrap=p.bwrap,
                               prog=p.prog or "bbl-bwrap", name=name, args=p.args,
                               env=p.env, fd_numbers=p.fd_numbers or [],
                               hold_tty=bool(p.detach), terminal=bool(p.tty))
        try:
            events = await self.forker.start(request, call.fds)
        except BaseException:
            self.registry.drop(record)
            raise
        with events:
            if not await self._until_started(record, events, call, notices):
                return
            die = bool(p.die_with_client) or record.die_with_parent
            if call.gone.is_set():  # it left before the start was known (the command ran)
                if die:
                    self.nursery.start_soon(self._kill, record)
                return
            call.cancel_when_gone = True  # from here on the registry follows it anyway
            try:
                await self._relay_end(record, events, call)
            except trio.Cancelled:
                if die:  # (for our caller, who is gone)
                    self.nursery.start_soon(self._kill, record)
                raise

    async def _kill(self, record: InstanceRecord) -> None:
        """SIGKILL to layer 1 (through its monitor): every layer below goes with it. A
        monitor that cannot be reached is killed itself (layer 1 dies with it)."""
        try:
            await self._control(record, ControlRequest(op="signal", signal=_signal.SIGKILL))
        except VarlinkError:
            record.kill()

    async def _until_started(self, record: InstanceRecord, events, call,
                             notices: list[str]) -> bool:
        """Until the monitor says started (True: the registry follows the instance from
        here), or that nothing will start (False: a command line that starts nothing said
        so and ended; or an error). The record lives only if it started."""
        try:
            while (item := await events.next()) is not None:
                event, fds = item
                if event.event == "failed":
                    channel.close_all(fds)
                    raise _start_failed(event)
                if event.event == "exited":  # (--help, --version: nothing started)
                    channel.close_all(fds)
                    await call.reply({"event": "exited", "id": record.id,
                                      "status": event.status})
                    return False
                if event.event == "started":
                    tty = self._started(record, event, fds)
                    await call.reply({"event": "started", "id": record.id,
                                      "layers": event.layers, "tty": tty is not None,
                                      "die_with_parent": event.die_with_parent,
                                      **({"notices": notices} if notices else {})},
                                     continues=True, fds=[tty] if tty is not None else [])
                    return True
                channel.close_all(fds)
            raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=1,
                               message="the instance's monitor ended before it started")
        finally:
            if record.state == "starting":
                self.registry.drop(record)

    def _started(self, record: InstanceRecord, event, fds: list[int]) -> int | None:
        """Record a start (the registry follows the instance from now on); returns the main
        command's pty master, if it came."""
        record.state, record.layers = "running", event.layers
        record.name, record.command = event.name, event.command
        record.pid, record.started = event.main_pid, event.started or record.started
        record.die_with_parent = event.die_with_parent
        record.monitor = fds[0] if fds else None
        tty = fds[1] if event.tty and len(fds) == 2 else None
        channel.close_all([fd for fd in fds[1:] if fd != tty])
        self.registry.publish(record, "started")
        self.nursery.start_soon(self.registry.follow, record)
        return tty

    async def _relay_end(self, record: InstanceRecord, events, call) -> None:
        """The instance's end, to the caller who started it. The registry owns the end (it
        follows the instance); the reply waits until the registry has it, so that a `ps`
        right after the caller returns agrees."""
        while (item := await events.next()) is not None:
            event, fds = item
            channel.close_all(fds)
            if event.event == "failed":  # (after its start: a command that replaced its
                raise _start_failed(event)  # layer's supervisor could not be executed)
            if event.event == "exited":
                record.reported_status = event.status
                await record.done.wait()
                await call.reply({"event": "exited", "id": record.id,
                                  "status": event.status})
                return
        raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=1,
                           message="the instance's monitor ended without a status")

    # ------------------------------------------------------------ instances

    async def list(self, p: ListParams, call) -> dict:
        if p.id is not None:  # (one instance, found as every method finds it)
            return {"instances": [self._live(p.id).entry(bool(p.brief))]}
        records = [*self.registry.ended] if p.all else []
        records += self.registry.live.values()
        return {"instances": [record.entry(bool(p.brief)) for record in records]}

    def _live(self, id: str) -> InstanceRecord:
        try:
            record = self.registry.find(id)
        except Ambiguous as exc:
            raise VarlinkError("io.bbl.Manager.AmbiguousInstance", id=id, candidates=[
                f"{r.id} {r.name or ''}".strip() for r in exc.records]) from None
        if record is None or record.state != "running":
            raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=id)
        return record

    async def signal(self, p: SignalParams, call) -> dict:
        record = self._live(p.id)
        if not 0 <= p.signal <= 64:
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="signal")
        if p.signal == 0:  # (kill -0: it runs, or _live said it does not)
            return {}
        await self._control(record, ControlRequest(op="signal", signal=p.signal, pid=p.pid))
        return {}

    async def stop(self, p: StopParams, call) -> dict:
        """SIGTERM to the main command (and a hangup of its terminal, if it has one and
        ignores SIGTERM: an interactive shell); SIGKILL to the whole tree after `timeout`
        seconds."""
        record = self._live(p.id)
        try:
            await self._control(record, ControlRequest(op="signal", signal=_signal.SIGTERM,
                                                       hangup=True))
        except VarlinkError as exc:  # (a monitor of an older BBL, which has no hangup)
            if exc.name != f"{SERVICE}.InvalidParameter":
                raise
            await self._control(record, ControlRequest(op="signal", signal=_signal.SIGTERM))
        with trio.move_on_after(max(0.0, 10.0 if p.timeout is None else p.timeout)):
            await record.done.wait()
        killed = not record.done.is_set()
        if killed:  # layer 1 killed: every layer below goes with it
            try:
                await self._control(record, ControlRequest(op="signal", signal=_signal.SIGKILL))
            except VarlinkError:
                pass  # its monitor is ending or gone: the registry hears of it all the same
            await record.done.wait()
        return {"status": record.status, "killed": killed}

    async def _control(self, record: InstanceRecord, request: ControlRequest):
        """One request to the instance's monitor; its reply. A request it refuses names the
        parameter that was wrong (InvalidParameter)."""
        try:
            with await call_monitor(self.registry.control_path(record.id),
                                        request) as monitor:
                answer = await monitor.next()
        except OSError:
            answer = None
        if answer is None:
            raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=record.id)
        reply, fds = answer
        channel.close_all(fds)
        if reply.op == "error":
            raise VarlinkError(f"{SERVICE}.InvalidParameter",
                               parameter=reply.parameter or "id")
        return reply

    async def exec(self, p: ExecParams, call) -> None:
        """A command in a running layer: started (pid; the pty master with tty), exited."""
        record = self._live(p.id)
        if len(call.fds) != (0 if p.tty else 3):
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="fds")
        argv = p.argv or (spec.INTERACTIVE_SHELL if p.tty else [])
        await self._exec(record, ControlRequest(op="exec", argv=argv, layer=p.layer,
                                                tty=bool(p.tty)), call)

    async def send_args(self, p: SendArgsParams, call) -> None:
        """Hand arguments to a running instance the way its spec says (see Exec's replies)."""
        record = self._live(p.id)
        if len(call.fds) != 3:
            raise VarlinkError(f"{SERVICE}.InvalidParameter", parameter="fds")
        await self._exec(record, ControlRequest(op="send-args", args=p.args), call)

    async def attach(self, p: AttachParams, call) -> None:
        """The app's own terminal (its monitor holds it): started (with this client's end of
        it), then exited when the instance ends."""
        await self._exec(self._live(p.id), ControlRequest(op="attach"), call)

    async def _exec(self, record: InstanceRecord, request: ControlRequest, call) -> None:
        try:
            monitor = await call_monitor(self.registry.control_path(record.id), request,
                                             call.fds)
        except OSError:
            raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=record.id) from None
        with monitor:  # (the monitor kills what it started when this closes first)
            await self._relay_exec(record, monitor, call)

    async def _relay_exec(self, record: InstanceRecord, monitor: channel.Messages, call,
                          started_as: str = "started") -> None:
        while (answer := await monitor.next()) is not None:
            reply, fds = answer
            if reply.op == "error":
                channel.close_all(fds)
                if reply.parameter == "terminal":  # (Attach)
                    raise VarlinkError("io.bbl.Manager.NoTerminal", id=record.id,
                                       message=reply.message)
                raise VarlinkError("io.bbl.Manager.ExecFailed", message=reply.message,
                                   exit_code=reply.exit_code or 1)
            if reply.op == "started":
                if started_as != "started":  # (a forward has no terminal to pass)
                    channel.close_all(fds)
                    fds = []
                await call.reply({"event": started_as, "id": record.id, "pid": reply.pid},
                                 continues=True, fds=fds)
            elif reply.op == "exited":
                channel.close_all(fds)
                await call.reply({"event": "exited", "id": record.id, "status": reply.status})
                return
            else:
                channel.close_all(fds)
        raise VarlinkError("io.bbl.Manager.NoSuchInstance", id=record.id)

    async def events(self, p: NoParams, call) -> None:
        """Instances starting and ending, as they happen, until the caller hangs up."""
        send, receive = trio.open_memory_channel(EVENT_BACKLOG)
        self.registry.subscribers.add(send)
        try:
            with receive:
                async for event in receive:
                    await call.reply(event, continues=True)
        finally:
            self.registry.subscribers.discard(send)


def _start_failed(event) -> VarlinkError:
    return VarlinkError("io.bbl.Manager.StartFailed", message=event.message,
                        exit_code=event.exit_code, reported=event.reported,
                        **({"fields": event.fields} if event.fields else {}))


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.sleep(0.05)  # (the reply goes out first)
    scope.cancel()


def _cgroup() -> dict:
    """Where instances' cgroup limits go, and the controllers there (Status)."""
    base = cgroupfs.base()
    return {"cgroup": base, "controllers": cgroupfs.controllers(base)} if base else {}


def _expand_profile(name_or_path: str, env: dict, name: str | None, tty: bool,
                    notices: list[str]) -> str:
    """A profile's spec for Run (in a worker thread: it reads the user's files); its notices
    added to `notices`."""
    try:
        if ("/" in name_or_path or name_or_path.endswith(".toml")) \
                and not os.path.isabs(name_or_path):  # ours is not the caller's directory
            raise profile.ProfileError([f"{name_or_path}: give the profile file's absolute "
                                        "path"])
        return profile.spec_for_start(name_or_path, env, name, tty, notices)
    except profile.ProfileError as exc:
        raise VarlinkError("io.bbl.Manager.StartFailed", message="\n".join(exc.problems),
                           exit_code=2) from None


class _Naming(msgspec.Struct):
    """The two top-level keys of a spec the daemon looks at; the rest is skipped unread (the
    monitor checks the whole spec)."""
    name: str = "sandbox"
    single_instance: bool = False


_naming = msgspec.json.Decoder(_Naming)


def _single_instance_name(text: str) -> str | None:
    """The spec's name if it asks for a single instance (not a spec: None; the monitor says
    what is wrong with it)."""
    try:
        naming = _naming.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    return naming.name if naming.single_instance else None
