"""bbld's link to its forker (trio): start the forker process once (bbld.monitors.forker),
send it start requests one at a time, and read each instance's events from its monitor."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys

import msgspec
import trio

from bbld import channel
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

    async def start(self, request: StartRequest, fds: list[int]) -> channel.Messages:
        """Send one start request; its monitor's events (bbld.messages.Event) follow on the
        channel.Messages returned.
        `fds`: stdin, stdout, stderr, working directory, then one per request.fd_numbers;
        they are the forker's once sent (ours are closed, the list emptied)."""
        mine, theirs = _seqpacket_pair()
        data = msgspec.json.encode(request)
        try:
            async with self.sending:
                self._ensure_running()
                await channel.asend(self.sock, data, [theirs.fileno(), *fds])
        except OSError as exc:
            mine.close()
            if exc.errno == errno.EMSGSIZE:  # longer than the socket's buffer (about 200 KB)
                raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=2,
                                   message=f"the start request ({len(data)} bytes) is too "
                                           f"large: {exc.strerror}") from None
            # the forker died just now (the next start makes a new one)
            raise VarlinkError("io.bbl.Manager.StartFailed", exit_code=1,
                               message=f"bbld's forker is gone ({exc.strerror}); start again"
                               ) from None
        finally:
            theirs.close()
        channel.close_all(fds)  # (ours would be held for the whole run)
        fds.clear()  # (in place: the caller's list, so that nobody closes them again)
        # What the instance's monitor says (bbld.messages.Event), until it ends:
        return channel.Messages(trio.socket.from_stdlib_socket(mine), _event_decoder.decode,
                                MAX_CONTROL)
