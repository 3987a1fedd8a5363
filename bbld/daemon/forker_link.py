"""The daemon's side of its forker: start the helper process once, send it start requests,
and follow each instance's events (trio)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from array import array

import msgspec
import trio

from bbld import protocol
from bbld.messages import MAX_CONTROL, Event, StartRequest
from bbld.protocol import VarlinkError

_event_decoder = msgspec.json.Decoder(Event)


def _seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


class ForkerLink:
    def __init__(self, instances: str):
        self.instances = instances  # where monitors put their control sockets
        self.process: subprocess.Popen | None = None
        self.sock = None
        # One sender at a time: trio lets only one task wait to write an fd, and a burst of
        # starts fills the channel's buffer (each request carries the caller's environment).
        self.sending = trio.Lock()

    def _ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if self.sock is not None:  # a forker that died: its spare reads the end of this one
            self.sock.close()
        mine, theirs = _seqpacket_pair()
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-m", "bbld.monitors.forker", str(theirs.fileno()),
             self.instances],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = trio.socket.from_stdlib_socket(mine)

    async def start(self, request: StartRequest, fds: list[int]):
        """Yield (Event, fds) for one new instance until its monitor ends. `fds`: stdin,
        stdout, stderr, working directory, then one per request.fd_numbers."""
        mine, theirs = _seqpacket_pair()
        data = msgspec.json.encode(request)
        try:
            async with self.sending:
                self._ensure_running()
                await self.sock.sendmsg([data], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [theirs.fileno(), *fds]))])
        except OSError as exc:  # EMSGSIZE: longer than the socket's buffer (about 200 KB)
            mine.close()
            raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=2,
                               message=f"the start request ({len(data)} bytes) is too large: "
                                       f"{exc.strerror}") from None
        finally:
            theirs.close()
        for fd in fds:  # the forker has its own copies: ours would be held for the whole run
            os.close(fd)
        fds.clear()  # (in place: the caller's list, so that nobody closes them again)
        with trio.socket.from_stdlib_socket(mine) as events:
            while True:
                data, ancdata, _flags, _ = await events.recvmsg(
                    MAX_CONTROL, socket.CMSG_SPACE(protocol.MAX_FDS * 4),
                    socket.MSG_CMSG_CLOEXEC)
                fds_in = protocol.fds_from_ancillary(ancdata)
                if not data:
                    return
                try:
                    yield _event_decoder.decode(data), fds_in
                except msgspec.DecodeError:
                    for fd in fds_in:
                        os.close(fd)
                    return
