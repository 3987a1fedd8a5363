"""bbld's methods, registry and server in process (pytest-trio), with a fake forker and fake
monitors that speak the real channels (bbld.messages over unix sockets), so that protocol and
registry behaviour is tested in milliseconds; the end-to-end tests test what needs the
kernel."""

import json
import os
import signal
import socket

import msgspec
import pytest
import trio
import trio.testing

from bbld import channel
from bbld.daemon import server
from bbld.messages import ControlReply, ControlRequest, Event

pytestmark = pytest.mark.trio
SPEC = {"layer": {"name": "app", "command": {"argv": ["app", "one"]}}}


class FakeMonitor:
    """An instance's monitor as bbld sees it: a control socket that answers status, watch,
    signal (SIGTERM and SIGKILL end it: 143, 137) and exec/send-args (pid 42, status 0)."""

    def __init__(self, directory: str, instance: str, nursery):
        self.id, self.ended, self.status = instance, trio.Event(), None
        self.signals: list[int] = []
        self.execs: list[ControlRequest] = []
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.path = os.path.join(directory, f"{instance}.sock")
        self.nursery = nursery

    async def listen(self) -> None:
        await self.sock.bind(self.path)
        self.sock.listen(8)
        self.nursery.start_soon(self._serve)

    def end(self, status: int) -> None:
        if not self.ended.is_set():
            self.status = status
            self.ended.set()

    async def _serve(self) -> None:
        while not self.ended.is_set():
            conn, _ = await self.sock.accept()
            self.nursery.start_soon(self._answer, conn)

    async def _answer(self, conn) -> None:
        with conn:
            data, fds = await channel.areceive(conn, 1 << 20, 3)
            channel.close_all(fds)
            if not data:  # a peer that hung up: bbld looking whether anyone still listens
                return
            request = msgspec.json.decode(data, type=ControlRequest)
            if request.op == "status":
                await _say(conn, ControlReply(op="status", entry={"id": self.id}))
            elif request.op == "watch":
                await self.ended.wait()
                await _say(conn, ControlReply(op="exited", status=self.status))
            elif request.op == "signal":
                self.signals.append(request.signal)
                await _say(conn, ControlReply(op="ok"))
                if request.signal in (signal.SIGTERM, signal.SIGKILL):
                    self.end(128 + request.signal)
            else:
                self.execs.append(request)
                await _say(conn, ControlReply(op="started", pid=42))
                await _say(conn, ControlReply(op="exited", status=0))


async def _say(conn, reply: ControlReply) -> None:
    await channel.asend(conn, msgspec.json.encode(reply))


class FakeEvents:
    def __init__(self, monitor: FakeMonitor | None, failure: str | None, name: str = "app"):
        self.monitor, self.failure, self.said, self.name = monitor, failure, [], name

    async def next(self):
        if self.failure:
            event, self.failure = Event(event="failed", message=self.failure, exit_code=2), ""
            return event, []
        if self.monitor is None or "exited" in self.said:
            return None
        if not self.said:
            self.said.append("started")
            return Event(event="started", name=self.name, command=["app", "one"],
                         layers=[{"layer": "app", "pid": 0}]), []
        await self.monitor.ended.wait()
        self.said.append("exited")
        return Event(event="exited", status=self.monitor.status), []

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class FakeForker:
    """bbld's link to its forker, as the methods use it: each start makes a FakeMonitor."""

    def __init__(self, directory: str, nursery):
        self.directory, self.nursery = directory, nursery
        self.monitors: dict[str, FakeMonitor] = {}
        self.failure: str | None = None

    async def start(self, request, fds):
        channel.close_all(fds)
        fds.clear()
        if self.failure:
            return FakeEvents(None, self.failure)
        monitor = FakeMonitor(self.directory, request.id, self.nursery)
        await monitor.listen()
        self.monitors[request.id] = monitor
        return FakeEvents(monitor, None, json.loads(request.spec).get("name", "sandbox"))


@pytest.fixture
async def bbld(tmp_path, nursery):
    """A bbld on tmp_path/bbld.sock with a fake forker; yields (socket path, forker)."""
    instances = tmp_path / "instances"
    instances.mkdir(mode=0o700)
    path = str(tmp_path / "bbld.sock")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(16)
    forker = FakeForker(str(instances), nursery)
    place = server.Place(runtime=str(tmp_path), socket=path, instances=str(instances))
    registry = server.Registry(place.instances)
    await registry.adopt(nursery)
    daemon = server.Daemon(forker, registry, nursery, place)
    serving = server.Server(daemon)

    async def accept():
        listener = trio.SocketListener(sock)
        while True:
            nursery.start_soon(serving.serve_connection, await listener.accept())

    nursery.start_soon(accept)
    yield path, forker


class Caller:
    def __init__(self, stream):
        self.stream, self.buffer = stream, b""

    @classmethod
    async def open(cls, path: str) -> "Caller":
        return cls(await trio.open_unix_socket(path))

    async def call(self, method: str, fds=(), more: bool = False, **parameters) -> None:
        message = json.dumps({"method": f"io.bbl.Manager.{method}", "parameters": parameters,
                              **({"more": True} if more else {})}).encode() + b"\0"
        await channel.asend_all(self.stream.socket, message, fds)

    async def reply(self) -> dict:
        with trio.fail_after(10):
            while b"\0" not in self.buffer:
                data = await self.stream.receive_some(65536)
                assert data, "bbld hung up"
                self.buffer += data
        frame, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(frame)


async def run(path: str, spec: dict, **parameters) -> Caller:
    caller = await Caller.open(path)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        await caller.call("Run", fds=[null] * 4, more=True, spec=json.dumps(spec), args=[],
                          env={}, **parameters)
    finally:
        os.close(null)
    return caller


async def call_once(path: str, method: str, **parameters) -> dict:
    caller = await Caller.open(path)
    await caller.call(method, **parameters)
    return await caller.reply()


async def test_a_start_stop_and_the_registry_agree(bbld):
    path, forker = bbld
    caller = await run(path, SPEC)
    started = (await caller.reply())["parameters"]
    assert started["event"] == "started"
    listed = (await call_once(path, "List", brief=True))["parameters"]["instances"]
    assert [(e["id"], e["state"]) for e in listed] == [(started["id"], "running")]
    stopped = await call_once(path, "Stop", id=started["id"], timeout=5)
    assert stopped["parameters"] == {"status": 143, "killed": False}
    assert (await caller.reply())["parameters"]["status"] == 143
    ended = (await call_once(path, "List", all=True))["parameters"]["instances"]
    assert [(e["state"], e["status"]) for e in ended] == [("exited", 143)]


async def test_a_caller_that_leaves_takes_a_die_with_client_instance_along(bbld):
    path, forker = bbld
    caller = await run(path, SPEC, die_with_client=True)
    started = (await caller.reply())["parameters"]
    await caller.stream.aclose()
    monitor = forker.monitors[started["id"]]
    with trio.fail_after(10):
        await monitor.ended.wait()
    assert monitor.signals == [signal.SIGKILL]


async def test_a_caller_that_leaves_leaves_other_instances_running(bbld):
    path, forker = bbld
    caller = await run(path, SPEC)
    started = (await caller.reply())["parameters"]
    await caller.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    monitor = forker.monitors[started["id"]]
    assert not monitor.ended.is_set() and monitor.signals == []
    listed = (await call_once(path, "List"))["parameters"]["instances"]
    assert [e["state"] for e in listed] == ["running"]
    monitor.end(0)


async def test_a_second_single_instance_start_is_forwarded(bbld):
    path, forker = bbld
    single = {**SPEC, "name": "solo", "single_instance": True}
    first = await run(path, single)
    started = (await first.reply())["parameters"]
    second = await run(path, single)
    forwarded = (await second.reply())["parameters"]
    assert (forwarded["event"], forwarded["id"], forwarded["pid"]) == (
        "forwarded", started["id"], 42)
    assert (await second.reply())["parameters"]["status"] == 0
    (request,) = forker.monitors[started["id"]].execs
    assert (request.op, request.args) == ("send-args", ["one"])
    assert len(forker.monitors) == 1
    forker.monitors[started["id"]].end(0)


async def test_a_failed_start_leaves_no_record(bbld):
    path, forker = bbld
    forker.failure = "fs[0] (bind): no such source"
    caller = await run(path, SPEC)
    failed = await caller.reply()
    assert (failed["error"], failed["parameters"]["exit_code"]) == (
        "io.bbl.Manager.StartFailed", 2)
    assert (await call_once(path, "List", all=True))["parameters"]["instances"] == []


async def test_wrong_parameters_are_named(bbld):
    path, _ = bbld
    caller = await Caller.open(path)
    await caller.call("Run", more=True, spec="{}", args=[], env={})  # no fds
    assert (await caller.reply())["parameters"] == {"parameter": "fds"}
    await caller.call("Signal", id="x", signal="TERM")
    assert (await caller.reply())["parameters"] == {"parameter": "signal"}
    await caller.call("Exec", more=True, id=5, argv=[])
    assert (await caller.reply())["parameters"] == {"parameter": "id"}
    await caller.call("Stop", id="x", timeout=None, extra=1)
    assert (await caller.reply())["parameters"] == {"parameter": "extra"}


async def test_a_signal_a_monitor_refuses_names_the_parameter(bbld):
    path, forker = bbld
    caller = await run(path, SPEC)
    started = (await caller.reply())["parameters"]
    monitor = forker.monitors[started["id"]]

    async def refuse(conn):  # as bbld.monitors.control does for a pid exec did not start
        with conn:
            if (await channel.areceive(conn, 1 << 20, 3))[0]:  # (not a peer that hung up)
                await _say(conn, ControlReply(op="error",
                                              message="pid 7 was not started by exec",
                                              parameter="pid"))

    monitor._answer = refuse
    refused = await call_once(path, "Signal", id=started["id"], signal=15, pid=7)
    assert refused["parameters"] == {"parameter": "pid"}
    monitor.end(0)
