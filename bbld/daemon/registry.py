"""bbld's registry of instances (trio): the live ones, the recently ended ones, and the way to
each instance's monitor (its control socket, bbld.monitors.control).

The monitors, not bbld, hold the instances: when bbld dies they run on, and a new bbld
re-adopts them from the sockets in RUNTIME/instances/. An instance that ended while no bbld
ran left ID.exited there; the next bbld reads it into the ended list and removes it.
"""

from __future__ import annotations

import collections
import functools
import os
import signal as _signal
import socket
import stat
import time

import msgspec
import trio

from bbld import cgroupfs, channel, peer
from bbld.daemon import log
from bbld.daemon.history import History
from bbld.messages import (
    CONTROL_FDS,
    INSTANCE_ID,
    MAX_CONTROL,
    ControlRequest,
    decode_reply,
)

KEEP_ENDED = 100  # ended instances `ps --all` still shows


class InstanceRecord:
    """What the daemon knows of one instance: its entry in the registry."""

    def __init__(self, id: str, state: str, started: float):
        self.id = id
        self.state = state  # starting, running, exited
        self.started = started  # seconds since the epoch
        self.name: str | None = None
        self.command: list[str] = []
        self.pid: int | None = None  # the main command's pid
        self.layers: list[dict] = []
        self.status: int | None = None
        self.ended: float | None = None  # seconds since the epoch, once it ended
        self.monitor: int | None = None  # pidfd of the monitor, for instances we started
        self.single_instance = False
        self.die_with_parent = False  # its spec asks to end with the caller that started it
        self.done = trio.Event()  # set once the registry has recorded its end (finish)
        self.reported_status: int | None = None  # what its start's report channel said
        self.cause: str | None = None  # why it ended, when a limit ended it (its monitor's)

    @classmethod
    def from_entry(cls, entry: dict) -> "InstanceRecord":
        record = cls(entry["id"], entry.get("state", "running"), entry.get("started", 0.0))
        record.name, record.command = entry.get("name"), entry.get("command", [])
        record.pid, record.layers = entry.get("pid"), entry.get("layers", [])
        record.status, record.ended = entry.get("status"), entry.get("ended")
        record.cause = entry.get("cause")
        record.single_instance = bool(entry.get("single_instance"))
        return record

    def entry(self, brief: bool = False) -> dict:
        """The record as io.bbl.Manager.List shows it (brief: without the layers)."""
        entry = {"id": self.id, "name": self.name or "", "state": self.state,
                 "started": self.started, "pid": self.pid, "command": self.command,
                 "layer_count": len(self.layers), "status": self.status,
                 "ended": self.ended, "single_instance": self.single_instance}
        if self.cause:
            entry["cause"] = self.cause
        usage = self.usage()
        if usage:
            entry["usage"] = usage
        if not brief:
            entry["layers"] = [{**layer, "usage": cgroupfs.usage(layer["cgroup"])}
                               if "cgroup" in layer and self.state == "running" else layer
                               for layer in self.layers]
        return entry

    def usage(self) -> dict[str, int]:
        """What the outermost limited layer (and all below it) uses now, while it runs."""
        limited = next((layer for layer in self.layers if "cgroup" in layer), None)
        return cgroupfs.usage(limited["cgroup"]) if limited and self.state == "running" else {}

    def kill(self) -> None:
        """SIGKILL the instance's monitor; layer 1 (die_with_parent) and all below follow."""
        if self.monitor is not None:
            try:
                _signal.pidfd_send_signal(self.monitor, _signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.monitor is not None:
            trio.lowlevel.notify_closing(self.monitor)  # (follow may be waiting on it)
            os.close(self.monitor)
            self.monitor = None


class Ambiguous(Exception):
    """More than one live instance fits a name or an id prefix."""

    def __init__(self, records: list[InstanceRecord]):
        super().__init__()
        self.records = records


class Registry:
    def __init__(self, directory: str, history: History | None = None):
        self.directory = directory
        self.history = history  # ended instances, kept across restarts
        self.live: dict[str, InstanceRecord] = {}
        self.ended: collections.deque[InstanceRecord] = collections.deque(maxlen=KEEP_ENDED)
        self.changed = trio.Event()  # set (and replaced) whenever an instance starts or ends
        self.subscribers: set[trio.MemorySendChannel] = set()  # Events callers
        self.nursery: trio.Nursery | None = None

    def control_path(self, instance_id: str) -> str:
        return os.path.join(self.directory, f"{instance_id}.sock")

    def find(self, key: str) -> InstanceRecord | None:
        """A live instance by id, by name, or by a prefix of its id (as docker and podman
        take them). Ambiguous when a name or a prefix fits more than one."""
        if key in self.live:
            return self.live[key]
        for fits in (lambda r: r.name == key, lambda r: r.id.startswith(key)):
            found = [r for r in self.live.values() if key and fits(r)]
            if len(found) > 1:
                raise Ambiguous(found)
            if found:
                return found[0]
        return None

    async def running_single(self, name: str) -> InstanceRecord | None:
        """The running single-instance instance called `name`; one that is starting is
        waited for (two starts racing end with one instance)."""
        while True:
            found = [r for r in self.live.values() if r.single_instance and r.name == name]
            if not found:
                return None
            if found[0].state == "running":
                return found[0]
            await self.changed.wait()

    def add(self, record: InstanceRecord) -> None:
        self.live[record.id] = record
        self.notify()

    def finish(self, record: InstanceRecord, status: int | None) -> None:
        """The instance ended (idempotent): it moves to the ended list."""
        if self.live.pop(record.id, None) is None:
            return
        status = record.reported_status if status is None else status
        record.state, record.status, record.pid = "exited", status, None
        record.close()
        self._ended(record)
        self.publish(record, "exited")
        try:
            os.unlink(os.path.join(self.directory, f"{record.id}.exited"))
        except OSError:
            pass  # none (it ended while we watched), or not one a monitor made
        record.done.set()
        self.notify()

    def _ended(self, record: InstanceRecord) -> None:
        record.ended = record.ended or time.time()
        self.ended.append(record)
        if self.history is not None:
            self.history.add(record.entry(brief=True))

    def drop(self, record: InstanceRecord) -> None:
        """An instance that never started."""
        self.live.pop(record.id, None)
        record.close()
        record.done.set()
        self.notify()

    def publish(self, record: InstanceRecord, event: str) -> None:
        """Tell the Events callers (one that fell too far behind is dropped) and the waiters."""
        message = {"event": event, "id": record.id, "name": record.name or "",
                   "time": time.time(), "status": record.status}
        for subscriber in list(self.subscribers):
            try:
                subscriber.send_nowait(message)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.subscribers.discard(subscriber)
                subscriber.close()
        self.notify()

    def notify(self) -> None:
        """Wake everyone waiting for a change (a start, a state change, an end)."""
        self.changed.set()
        self.changed = trio.Event()

    # ------------------------------------------------------------ monitors

    async def follow(self, record: InstanceRecord) -> None:
        """Until the instance ends: its monitor answers a watch request when it does."""
        status = None
        try:
            status = await self._watch(record)
        except Exception:  # noqa: BLE001 (a bug here must not take the daemon down)
            log.bug(f"following instance {record.id}")
        if status is None:  # its monitor ended without a word (killed): its socket stayed
            if record.monitor is not None:  # (its exit closes its files before the pidfd
                try:  # says so: the listener may outlive the watch connection's end)
                    await trio.lowlevel.wait_readable(record.monitor)
                except (trio.ClosedResourceError, OSError):
                    pass
            _remove_if_stale(self.control_path(record.id))
        self.finish(record, status)

    async def _watch(self, record: InstanceRecord) -> int | None:
        status = None
        try:
            with await call_monitor(self.control_path(record.id),
                                        ControlRequest(op="watch")) as call:
                while (answer := await call.next()) is not None:
                    reply, fds = answer
                    channel.close_all(fds)
                    if reply.op == "exited":
                        status, record.cause = reply.status, reply.message
                        break
        except OSError:  # its monitor cannot be reached: it may still run (its socket gone)
            if record.monitor is not None:
                try:
                    await trio.lowlevel.wait_readable(record.monitor)  # a pidfd: its end
                except trio.ClosedResourceError:
                    return None  # finished meanwhile, by the start that made it
            status = self._ended_status(record)
        return status

    def _ended_status(self, record: InstanceRecord) -> int | None:
        entry = _read_exited(os.path.join(self.directory, f"{record.id}.exited"))
        if entry:
            record.cause = entry.get("cause")
        return entry.get("status") if entry else None

    async def adopt(self, nursery: trio.Nursery) -> None:
        """Take over the instances a previous bbld left running, and those that ended. The
        directory is bbld's own (main checked it: a real 0700 directory of the user's), but
        nothing in it is taken on trust: only entries named as BBL names them and of the
        kind it makes (a socket, a regular file of the user's) are used, nothing is followed
        or opened in a way that could block, only such entries are removed, and what is
        skipped is said in the log. bbld waits for the running ones' monitors at most
        ADOPT_WAIT seconds together; one that answers later (stopped, say) is adopted then."""
        self.nursery = nursery  # (the followers of what is adopted run there)
        for entry in self.history.load() if self.history is not None else []:
            try:
                self.ended.append(InstanceRecord.from_entry({**entry, "state": "exited"}))
            except (KeyError, TypeError, AttributeError):
                pass
        sockets = []
        for name in sorted(os.listdir(self.directory)):
            instance, _, kind = name.partition(".")
            path = os.path.join(self.directory, name)
            if not INSTANCE_ID.fullmatch(instance) or kind not in ("exited", "sock"):
                if not (name.startswith(".") and name.endswith(".exited")):  # (a monitor's)
                    log.say(f"skipped {path}: not a name bbld gives")
            elif kind == "exited":
                self._adopt_ended(path)
            elif _is_ours(path, stat.S_ISSOCK):
                sockets.append(path)
            else:
                log.say(f"skipped {path}: not a socket of this user")
        pending, done = len(sockets), trio.Event()

        async def adopt_one(path: str) -> None:
            nonlocal pending
            try:
                await self._adopt_running(path)
            finally:
                pending -= 1
                if not pending:
                    done.set()

        for path in sockets:
            nursery.start_soon(adopt_one, path)
        if sockets:
            with trio.move_on_after(ADOPT_WAIT):
                await done.wait()

    def _adopt_ended(self, path: str) -> None:
        entry = _read_exited(path)
        if entry is None:
            return log.say(f"skipped {path}: not a regular file of this user with an entry")
        try:
            record = InstanceRecord.from_entry(entry)
            record.state = "exited"
            self._ended(record)
        except (KeyError, TypeError, AttributeError):
            log.say(f"{path}: an entry bbld cannot read; removed")
        os.unlink(path)

    async def _adopt_running(self, path: str) -> None:
        expected = os.path.basename(path).removesuffix(".sock")
        try:
            with await call_monitor(path, ControlRequest(op="status")) as call:
                answer = await call.next()
                if answer is None:
                    raise OSError("no answer")
                channel.close_all(answer[1])
                record = InstanceRecord.from_entry(answer[0].entry)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: its monitor is gone (killed), a stale socket
            return
        except (OSError, TypeError, KeyError, AttributeError, msgspec.DecodeError) as exc:
            return log.say(f"skipped {path}: its monitor did not answer as one ({exc})")
        if record.id != expected:  # a monitor only ever names its own socket
            return log.say(f"skipped {path}: it answers for another instance")
        self.live[record.id] = record
        self.notify()
        self.nursery.start_soon(self.follow, record)


ADOPT_WAIT = 2.0  # seconds bbld's start waits for the monitors of running instances


def _remove_if_stale(path: str) -> None:
    """An ended instance's control socket that nobody listens on any more: its monitor was
    killed before it could remove it. (A monitor that ends normally removes its own.)"""
    if not _is_ours(path, stat.S_ISSOCK):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK
                       | socket.SOCK_CLOEXEC) as probe:
        try:
            with channel.Address(path) as address:
                probe.connect(address)
        except ConnectionRefusedError:
            try:
                os.unlink(path)
            except OSError:
                pass  # (removed meanwhile)
        except OSError:
            pass  # someone listens (or the path went): not ours to remove


def _is_ours(path: str, kind) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return kind(info.st_mode) and info.st_uid == os.getuid()


def _read_exited(path: str) -> dict | None:
    """The final entry a monitor left in ID.exited: a regular file of the user's, read
    without following a link or waiting on a FIFO; None if it is anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        entry = msgspec.json.decode(os.read(fd, MAX_CONTROL))
        return entry if isinstance(entry, dict) else None
    except (OSError, msgspec.DecodeError):
        return None
    finally:
        os.close(fd)


async def call_monitor(path: str, request: ControlRequest, fds=()) -> channel.Messages:
    """A request to an instance's monitor (bbld.monitors.control): the connection, with
    `request` sent; its replies (ControlReply) follow on it. The monitor must be the user's,
    in bbld's own namespaces (bbld.peer), as bbld is for it: whatever else listens at its
    socket's name gets nothing (PermissionError)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        with channel.Address(path) as address:
            await sock.connect(address)
        try:
            peer.check(sock, _home(), "the instance's monitor", "bbld")
        except peer.Refused as refused:
            raise PermissionError(f"{path}: {refused}") from None
        await channel.asend(sock, msgspec.json.encode(request), fds)
    except BaseException:
        sock.close()
        raise
    return channel.Messages(sock, decode_reply, MAX_CONTROL, CONTROL_FDS)


@functools.cache
def _home() -> peer.Identity:
    return peer.own_namespaces()
