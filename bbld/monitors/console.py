"""The app's own terminal, held by its monitor for as long as the instance runs.

The main command's pty master (made inside the sandbox: bbld.engine.terminal) stays here, so
that the app's terminal outlives any one client: `bblctl start` in the foreground and
`bblctl attach ID` show it through a socket of their own (the wire: bbld.console), and
leaving one (the detach key, or the client's end) leaves the app running. What the app writes
is read here all along: relayed to the attached client, and the last SCROLLBACK bytes kept
for the next one. One client at a time: a new attach takes the terminal over, and the
previous client is told so and let go (the way `screen -d -r` does), so a client left on a
lost terminal never locks the app out.

Driven by the instance's poll loop (Instance.watch), like the control socket: nothing here
blocks. Each side holds the other back, as a terminal would: a client that reads slower
than the app writes (the terminal's output is not read until the client took the last
packet), an app that reads input slower than the client sends it (the client's packets are
not read while TYPEAHEAD bytes wait for the app).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import termios

from bbld import console as wire
from bbld.engine import syscalls as sc

SCROLLBACK = 64 * 1024  # the app's output kept for the next client to attach
CHUNK = 16 * 1024  # read from the terminal, sent to the client, at a time
TYPEAHEAD = 64 * 1024  # input waiting for the app (a long paste) before the client waits


class Console:
    def __init__(self, instance, master: int):
        self.instance = instance
        self.master = master
        os.set_blocking(master, False)
        self.kept = bytearray()  # the app's last SCROLLBACK bytes of output
        self.typed = bytearray()  # input the terminal has not taken yet
        self.client: socket.socket | None = None
        self.pending = b""  # a packet the client has not taken yet
        self.sized = True  # whether the client's size has come since it attached
        self.open = True  # the app's side of the terminal is still held by someone
        self._watch()

    def attach(self) -> int:
        """A client's end of a new connection to the terminal (theirs to keep): what the app
        wrote lately comes first. A client attached before is let go."""
        if not self.open:
            raise OSError(errno.EIO, "the app's terminal has closed")
        if self.client is not None:
            self._let_go(b"the terminal was attached elsewhere")
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        ours.setblocking(False)
        self.client, self.pending, self.sized = ours, b"", False
        replay = _from_a_line(self.kept) if len(self.kept) >= SCROLLBACK else bytes(self.kept)
        try:
            for start in range(0, len(replay), CHUNK):  # (a new socket's buffer holds them)
                ours.send(wire.OUTPUT + replay[start:start + CHUNK])
        except BlockingIOError:
            pass  # (a buffer smaller than the scrollback: the rest is not shown)
        self._watch()
        return theirs.detach()

    def hang_up(self) -> None:
        """Close the terminal, as a terminal window closing does: the kernel sends SIGHUP to
        the app's session (how an interactive shell is ended). Its client gets the end."""
        if self.master is None:
            return
        self.instance.unwatch(self.master)
        if self.client is not None:
            self._drop()
        os.close(self.master)
        self.master, self.open = None, False
        self.typed.clear()

    def close(self) -> None:
        """The instance has ended: the client gets what the app wrote last, then the end.
        (Blocking now, with a timeout: a client that stopped reading does not hold us.)"""
        if self.master is None:
            return  # (hung up)
        self.instance.unwatch(self.master)
        if self.client is not None:
            self.instance.unwatch(self.client.fileno())
            self.client.setblocking(True)
            self.client.settimeout(2)
        while self.client is not None and self.pending and self._flush():
            pass
        while self.open and self._read():
            pass
        if self.client is not None:
            self._drop()
        os.close(self.master)

    def _watch(self) -> None:
        """What each side is waited for, from the state: the app's output unless a packet
        waits for the client, room for typed input, the client's packets unless enough input
        waits for the app, room for the packet that waits."""
        wanted = [(self.master, self._master_ready,
                   (select.POLLIN if self.open and not self.pending else 0)
                   | (select.POLLOUT if self.typed and self.open else 0))]
        if self.client is not None:
            wanted.append((self.client.fileno(), self._client_ready,
                           (select.POLLIN if len(self.typed) < TYPEAHEAD else 0)
                           | (select.POLLOUT if self.pending else 0)))
        for fd, callback, events in wanted:
            if events:
                self.instance.watch(fd, callback, events)
            else:
                self.instance.unwatch(fd)

    # ------------------------------------------------------------ the app's side

    def _master_ready(self) -> None:
        if self.typed:
            self._type()
        if self.open and not self.pending:
            self._read()
        self._watch()

    def _read(self) -> bool:
        """Take one chunk of output; False when no more can be taken now."""
        try:
            data = os.read(self.master, CHUNK)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            data = b""  # EIO: nothing in the sandbox holds the terminal any more
        if not data:
            self.open = False
            self.typed.clear()
            if self.client is not None and not self.pending:
                self._drop()
            return False
        self.kept += data
        del self.kept[:-SCROLLBACK]
        if self.client is None:
            return True
        self.pending = wire.OUTPUT + data
        return self._flush()

    def _type(self) -> None:
        """Give the terminal what was typed, as much as it takes now."""
        try:
            del self.typed[:os.write(self.master, self.typed)]
        except BlockingIOError:
            pass
        except OSError:
            self.typed.clear()  # (its terminal closed: nobody reads it)

    # ------------------------------------------------------------ the client's side

    def _client_ready(self) -> None:
        """Input or a size from the client, its end, or room for pending output."""
        if self.pending:
            self._flush()
        if self.client is not None and len(self.typed) < TYPEAHEAD \
                and not self._take_input():
            self._drop()  # detached (or gone): the app goes on
        self._watch()

    def _take_input(self) -> bool:
        """What the client has sent (also after it left: its last keys count); False at its
        end. Reads until TYPEAHEAD bytes wait for the app."""
        while len(self.typed) < TYPEAHEAD:
            try:
                packet = self.client.recv(wire.PACKET, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not packet:
                return False
            self._from_client(packet)
        return True

    def _from_client(self, packet: bytes) -> None:
        tag, payload = packet[:1], packet[1:]
        if tag == wire.INPUT and self.open:
            self.typed += payload
            self._type()
        elif tag == wire.SIZE and len(payload) == 8:
            self._resize(payload)

    def _resize(self, size: bytes) -> None:
        """The client's window size; the first one after an attach also asks the app to draw
        its screen again (SIGWINCH, even when the size is the same)."""
        try:
            same = fcntl.ioctl(self.master, termios.TIOCGWINSZ, b"\0" * 8) == size
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
            if same and not self.sized:
                fcntl.ioctl(self.master, sc.TIOCSIG, signal.SIGWINCH)
        except OSError:
            pass
        self.sized = True

    def _flush(self) -> bool:
        """Send the pending packet; False while the client has no room for it."""
        try:
            self.client.send(self.pending)
        except BlockingIOError:
            return False
        except OSError:  # it has left
            self._take_input()
            self._drop()
            return False
        self.pending = b""
        if not self.open:
            self._drop()  # (it has all of it)
        return True

    def _let_go(self, why: bytes) -> None:
        try:
            self.client.send(wire.NOTE + why)
        except OSError:
            pass
        self._drop()

    def _drop(self) -> None:
        self.instance.unwatch(self.client.fileno())
        self.client.close()
        self.client, self.pending = None, b""


def _from_a_line(kept: bytearray) -> bytes:
    """The scrollback from its first whole line (the oldest one was cut)."""
    start = kept.find(b"\n")
    return bytes(kept[start + 1:] if start >= 0 else kept)
