"""The local side of a terminal made inside a sandbox (`bblctl attach`, `bblctl start` on a
terminal): raw mode on our terminal, bytes relayed both ways, window size changes forwarded,
and the terminal restored on every way out."""

import errno
import fcntl
import os
import select
import termios
import tty

from bblctl.wire import signal


class Terminal:
    """Raw mode on our terminal (if stdin is one) and its size mirrored onto the pty; both
    undone on exit, whatever the way out."""

    def __init__(self, master: int):
        self.master = master
        self.saved = None
        self.previous_winch = None

    def __enter__(self):
        if os.isatty(0):
            self.saved = termios.tcgetattr(0)
            self._copy_size()
            self.previous_winch = signal.signal(signal.SIGWINCH, lambda *_: self._copy_size())
            tty.setraw(0)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, self.saved)
            signal.signal(signal.SIGWINCH, self.previous_winch)

    def _copy_size(self) -> None:
        try:
            size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass


def attach_terminal(master: int, daemon) -> None:
    """Our terminal on the pty whose `master` we got, until the command's end (the daemon's
    socket turns readable with its status) or the pty's; `master` is closed after."""
    try:
        with Terminal(master):
            relay(master, daemon)
    finally:
        os.close(master)


def relay(master: int, daemon) -> None:
    """Copy stdin to the pty and the pty to stdout until the pty's other side is gone."""
    inputs = [0, master, daemon]
    while True:
        try:
            ready, _, _ = select.select(inputs, [], [])
        except InterruptedError:
            continue
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                data = b""  # EIO: every process holding the pty's slave has ended
            if not data:
                return
            _write_all(1, data)
        if 0 in ready:
            data = os.read(0, 65536)
            if data:
                _write_all(master, data)
            else:  # our input ended: the terminal's end-of-file, then only output
                _write_all(master, b"\x04")
                inputs.remove(0)
        if daemon in ready:  # the exit status arrived (or bbld went away): drain, then stop
            _drain(master)
            return


def _drain(master: int) -> None:
    while select.select([master], [], [], 0.05)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:
            return
        if not data:
            return
        _write_all(1, data)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]

