"""bbld's limits, in process (pytest-trio): what clients together can make it hold, how long a
connection may wait, how many there may be."""

import json
import os
import socket

import pytest
import trio

from bbld.daemon import server

pytestmark = pytest.mark.trio

PING = b'{"method": "io.bbl.Manager.Ping"}\0'
EVENTS = b'{"method": "io.bbl.Manager.Events", "more": true}\0'


@pytest.fixture
async def bbld(tmp_path, nursery):
    """An in-process bbld on tmp_path/bbld.sock; yields a function that starts it with the
    given limits and returns the socket path."""
    instances = tmp_path / "instances"
    instances.mkdir(mode=0o700)

    async def start(**limits) -> str:
        path = str(tmp_path / "bbld.sock")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(64)
        ready = trio.Event()
        place = server.Place(runtime=str(tmp_path), socket=path, instances=str(instances))
        nursery.start_soon(server.serve, trio.SocketListener(sock), place, ready.set,
                           server.Limits(**limits))
        await ready.wait()
        return path

    return start


async def connect(path: str) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def replies(stream: trio.SocketStream, count: int = 1) -> list[dict]:
    """`count` replies (fewer if the daemon closes first)."""
    data = b""
    with trio.fail_after(10):
        while data.count(b"\0") < count:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(frame) for frame in data.split(b"\0") if frame]


async def closed(stream: trio.SocketStream) -> bool:
    """Whether the daemon has ended the connection (EOF or reset) within 10 s."""
    with trio.fail_after(10):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
    return True


async def test_unfinished_messages_share_one_budget(bbld):
    path = await bbld(buffered=1 << 20)
    first, second = await connect(path), await connect(path)
    await first.send_all(b"x" * (700 << 10))  # no NUL: a message that has not ended
    await trio.sleep(0.2)
    await second.send_all(b"y" * (700 << 10))
    (reply,) = await replies(second)
    assert reply["error"] == "io.bbl.Manager.InvalidMessage"
    assert "too many unfinished messages" in reply["parameters"]["reason"]
    assert await closed(second)
    await first.send_all(b"\0" + PING)  # the first one's message ends: it goes on
    answers = await replies(first, 2)
    assert answers[0]["error"] == "io.bbl.Manager.InvalidMessage"  # (x... is not JSON)


async def test_a_message_that_takes_too_long_is_refused(bbld):
    path = await bbld(frame=0.3)
    stream = await connect(path)
    await stream.send_all(PING[:10])
    (reply,) = await replies(stream)
    assert reply["error"] == "io.bbl.Manager.InvalidMessage"
    assert "took longer than 0.3 s" in reply["parameters"]["reason"]


async def test_an_idle_connection_is_closed_quietly(bbld):
    path = await bbld(idle=0.3)
    stream = await connect(path)
    await stream.send_all(PING)
    assert (await replies(stream))[0]["parameters"]["pid"] == os.getpid()
    start = trio.current_time()
    assert await closed(stream)
    assert 0.25 < trio.current_time() - start < 5


async def test_at_the_connection_limit_the_longest_idle_one_makes_room(bbld):
    path = await bbld(connections=3)
    idle = [await connect(path) for _ in range(3)]
    for stream in idle:
        await stream.send_all(PING)
        await replies(stream)
    newcomer = await connect(path)
    await newcomer.send_all(PING)
    assert (await replies(newcomer))[0]["parameters"]["pid"] == os.getpid()
    assert await closed(idle[0])  # the one idle the longest


async def test_at_the_connection_limit_with_every_call_in_progress_a_newcomer_hears_why(bbld):
    path = await bbld(connections=2)
    busy = [await connect(path) for _ in range(2)]
    for stream in busy:
        await stream.send_all(EVENTS)  # a stream: in progress until the caller hangs up
    await trio.sleep(0.2)
    newcomer = await connect(path)
    (reply,) = await replies(newcomer)
    assert reply["error"] == "io.bbl.Manager.Busy"
    assert "2 connections" in reply["parameters"]["reason"]


async def test_a_reset_connection_is_not_a_bug(bbld, capfd):
    path = await bbld()
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(path)
    raw.send(PING[:5])
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close: RST
    raw.close()
    stream = await connect(path)
    await stream.send_all(PING)
    await replies(stream)
    assert "Traceback" not in capfd.readouterr().err
