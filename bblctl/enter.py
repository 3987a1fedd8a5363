"""`bblctl exec` and `bblctl attach`: a command in a layer of a running instance.

exec passes stdin, stdout and stderr through; attach gets a pty made inside the sandbox (the
daemon passes its master here), puts the local terminal in raw mode, relays bytes both ways,
forwards window size changes, and restores the terminal on every way out.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import termios
import tty

from bblctl.cli import UsageError
from bblctl.client import SignalForwarder, connect
from bblctl.wire import signal


def parse(argv: list[str], command: str) -> tuple[str, str | None, list[str]]:
    """`[--layer NAME] ID [--] [CMD...]`: options first, then the id, then the command."""
    layer = None
    while argv and argv[0].startswith("--") and argv[0] != "--":
        name, eq, value = argv[0].partition("=")
        if name != "--layer":
            raise UsageError(f"unknown option {argv[0]}")
        if not eq:
            if len(argv) < 2:
                raise UsageError("--layer needs a layer name; see bblctl tree")
            value, argv = argv[1], argv[1:]
        layer, argv = value, argv[1:]
    if not argv or argv[0] == "--":
        raise UsageError(f"{command} needs an instance id or name; see bblctl ps")
    instance, rest = argv[0], argv[1:]
    if rest and rest[0] == "--layer":  # also after the id
        return parse(["--layer", *rest[1:2], instance, *rest[2:]], command)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return instance, layer, rest


def exec_(argv: list[str]) -> int:
    instance, layer, command = parse(argv, "exec")
    if not command:
        raise UsageError("exec needs a command after the instance: bblctl exec ID -- CMD...")
    return _run_in(instance, "io.bbl.Manager.Exec", argv=command,
                   **({"layer": layer} if layer else {}))


def send_args(argv: list[str]) -> int:
    """`ID|NAME [--] ARGS...`: hand ARGS to the running instance (its spec says how)."""
    if not argv or argv[0] == "--":
        raise UsageError("send-args needs an instance id or name; see bblctl ps")
    instance, args = argv[0], argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    return _run_in(instance, "io.bbl.Manager.SendArgs", args=args)


def _run_in(instance: str, method: str, **parameters) -> int:
    """Exec or SendArgs with our stdio; signals we get go to the command; its status."""
    with SignalForwarder() as forwarder, connect() as conn:
        for reply in conn.stream(method, fds=(0, 1, 2), id=instance, **parameters):
            if reply["event"] == "started":
                forwarder.aim(id=instance, pid=reply["pid"])
            elif reply["event"] == "exited":
                return reply["status"]
    return 1


def attach(argv: list[str]) -> int:
    instance, layer, command = parse(argv, "attach")  # no command: bbld starts a shell
    with connect() as conn:
        replies = conn.stream("io.bbl.Manager.Exec", id=instance, argv=command,
                              tty=True, **({"layer": layer} if layer else {}))
        next(replies)  # started: the pty's master came with it
        if not conn.fds:
            raise UsageError("the daemon sent no terminal")
        master = conn.fds.pop(0)
        try:
            with Terminal(master):
                relay(master, conn.sock)
        finally:
            os.close(master)
        for reply in replies:
            if reply["event"] == "exited":
                return reply["status"]
    return 1


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

