"""The local side of a terminal made inside a sandbox: raw mode on our terminal, bytes relayed
both ways, window size changes forwarded, and the terminal restored on every way out.

Two kinds of far side: the app's own terminal, which its monitor holds (`bblctl start` on a
terminal, `bblctl attach ID`; the wire: bbld.console), which a detach key leaves running;
and a pty master of our own (`bblctl attach --new`, bubblewrap command lines), whose command
ends with us.
"""

import errno
import fcntl
import os
import select
import sys
import termios
import tty

from bblctl.wire import signal, socket
from bbld import console as wire

DEFAULT_DETACH_KEY = "ctrl-]"
ENDED, DETACHED = "ended", "detached"  # how a relay ends (or the monitor's note)


def detach_key(name: str | None) -> bytes | None:
    """The byte a key name (`ctrl-]`, `^A`, `none`) stands for; ValueError if it is none of
    them. Default: $BBL_DETACH_KEY, else Ctrl-]."""
    if name is None:
        name = os.environ.get("BBL_DETACH_KEY") or DEFAULT_DETACH_KEY
    if name.lower() == "none":
        return None
    lowered = name.lower()
    key = lowered[5:] if lowered.startswith("ctrl-") else lowered[1:] \
        if lowered.startswith("^") else ""
    if len(key) == 1 and "@" <= key.upper() <= "_":
        return bytes([ord(key.upper()) - 64])
    raise ValueError(f"detach key {name!r}: give ctrl-X (X a letter or one of @[\\]^_), ^X, "
                     "or none")


def said_detached(how: str, instance: str) -> int:
    """Say that we let the app's terminal go (and why, if the monitor said): it runs on.
    Status 0."""
    why = "" if how == DETACHED else f" ({how})"
    print(f"bblctl: detached from {instance}{why}; `bblctl attach {instance}` shows its "
          "terminal again", file=sys.stderr)
    return 0


class Pty:
    """A pty master we hold: its command ends when we close it."""

    def __init__(self, fd: int):
        self.fd = fd

    def read(self) -> bytes | str:
        try:
            return os.read(self.fd, 65536) or ENDED
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return ENDED  # EIO: every process holding the pty's slave has ended

    def write(self, data: bytes) -> None:
        _write_all(self.fd, data)

    def resize(self, size: bytes) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, size)

    def close(self) -> None:
        os.close(self.fd)


class Console:
    """The app's terminal, through its monitor (bbld.console)."""

    def __init__(self, fd: int):
        self.sock = socket.socket(fileno=fd)
        self.fd = fd

    def read(self) -> bytes | str:
        try:
            packet = self.sock.recv(wire.PACKET)
        except OSError:
            packet = b""
        if packet[:1] == wire.OUTPUT:
            return packet[1:]
        if packet[:1] == wire.NOTE:
            return packet[1:].decode(errors="replace")
        return ENDED

    def write(self, data: bytes) -> None:
        for start in range(0, len(data), wire.PACKET - 1):
            self.sock.sendall(wire.INPUT + data[start:start + wire.PACKET - 1])

    def resize(self, size: bytes) -> None:
        self.sock.sendall(wire.SIZE + size)

    def close(self) -> None:
        self.sock.close()


class Terminal:
    """Raw mode on our terminal (if stdin is one) and its size mirrored onto the far side;
    both undone on exit, whatever the way out."""

    def __init__(self, far):
        self.far = far
        self.saved = None
        self.previous_winch = None

    def __enter__(self):
        if os.isatty(0):
            self.saved = termios.tcgetattr(0)
            self._copy_size()
            self.previous_winch = signal.signal(signal.SIGWINCH, lambda *_: self._copy_size())
            tty.setraw(0, termios.TCSADRAIN)  # (not TCSAFLUSH: keys typed ahead count)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
            signal.signal(signal.SIGWINCH, self.previous_winch)

    def _copy_size(self) -> None:
        try:
            self.far.resize(fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            pass


def attach_terminal(fd: int, daemon, console: bool = False, key: bytes | None = None) -> str:
    """Our terminal on the far side `fd` (the app's console, or a pty master), until it ends
    (or, for a pty, the daemon's socket turns readable with the command's status), or `key`
    is typed (DETACHED), or the monitor lets us go (its note). `fd` is closed after."""
    far = Console(fd) if console else Pty(fd)
    try:
        with Terminal(far):
            return relay(far, daemon, key)
    finally:
        far.close()


def relay(far, daemon, key: bytes | None) -> str:
    """Copy stdin to the far side and the far side to stdout."""
    inputs = [0, far.fd, daemon]
    while True:
        try:
            ready, _, _ = select.select(inputs, [], [])
        except InterruptedError:
            continue
        if far.fd in ready:
            data = far.read()
            if isinstance(data, str):
                return data
            try:
                _write_all(1, data)
            except OSError:  # our terminal is gone (hung up): leave
                return DETACHED
        if 0 in ready:
            try:
                data = os.read(0, 65536)
            except OSError:  # (EIO: our terminal hung up)
                data = b""
            if key is not None and key in data:
                far.write(data[:data.index(key)])
                return DETACHED
            if data:
                far.write(data)
            else:  # our input ended: then only output (and a pty of ours gets the
                if isinstance(far, Pty):  # terminal's end-of-file; the app's own terminal
                    far.write(b"\x04")  # is not ours to end)
                inputs.remove(0)
        if daemon in ready:  # the exit status arrived (or bbld went away): drain, then stop
            _drain(far)
            return ENDED


def _drain(far) -> None:
    while select.select([far.fd], [], [], 0.05)[0]:
        data = far.read()
        if isinstance(data, str):
            return
        _write_all(1, data)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
