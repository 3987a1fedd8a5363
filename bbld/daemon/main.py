"""`bbld`: run the daemon in the foreground (systemd runs it so).

It listens on the socket systemd passes (LISTEN_FDS) or on its own at
$XDG_RUNTIME_DIR/bbl/bbld.sock (see bbld.paths), tells systemd READY=1 when NOTIFY_SOCKET is
set, and removes its socket when it ends. A lock in the runtime directory makes sure that only
one bbld serves it (flock on the directory itself: nothing is left behind).
"""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import socket
import sys

import trio

from bbld import __version__, paths
from bbld.daemon import server

SD_LISTEN_FDS_START = 3
USAGE = """usage: bbld [--socket PATH]

Run the BBL daemon in the foreground. Default socket: $XDG_RUNTIME_DIR/bbl/bbld.sock."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    socket_path = None
    while argv:
        if argv[0] in ("-h", "--help"):
            print(USAGE)
            return 0
        if argv[0] == "--version":
            print(f"bbld {__version__}")
            return 0
        if argv[0] == "--socket" and len(argv) > 1:
            socket_path, argv = argv[1], argv[2:]
            continue
        print(f"bbld: unknown argument {argv[0]!r}; see bbld --help", file=sys.stderr)
        return 2
    try:
        listener, cleanup = _activated_socket() or _own_socket(socket_path)
        instances = os.path.join(os.path.dirname(socket_path), "instances") if socket_path \
            else paths.instances_dir()
    except (paths.UnsafeDirectory, AlreadyRunning) as exc:
        print(f"bbld: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"bbld: cannot listen on {socket_path or paths.socket_path()}: {exc.strerror}",
              file=sys.stderr)
        return 1
    try:
        paths.private_directory(instances, closed=0o077)  # (its entries: Registry.adopt)
    except (paths.UnsafeDirectory, OSError) as exc:
        cleanup()
        message = exc if isinstance(exc, paths.UnsafeDirectory) else \
            f"{instances}: {exc.strerror}"
        print(f"bbld: {message}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    try:
        trio.run(_run, listener, instances)
    finally:
        cleanup()
        try:
            os.rmdir(instances)  # only when no instance is left in it
        except OSError:
            pass
    return 0


def _raise_fd_limit() -> None:
    """Every running instance holds a few of bbld's fds (its monitor's pidfd, a connection to
    its control socket): take the hard limit, not the soft default of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class AlreadyRunning(Exception):
    pass


def _activated_socket():
    """The listening socket systemd passed, if it passed one to us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or \
            int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    return sock, lambda: None


def _own_socket(path: str | None):
    directory = paths.ensure_runtime_dir(os.path.dirname(path) if path else None)
    path = path or paths.socket_path()
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # no lock file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise AlreadyRunning(f"another bbld already serves {directory}") from None
    try:
        os.unlink(path)  # a stale socket: whoever made it no longer holds the lock
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the socket is created 0600
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(128)

    def cleanup():
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(lock)

    return sock, cleanup


def _notify_ready() -> None:
    """sd_notify READY=1, for systemd or for the bblctl that started us; the variable is
    dropped so that nothing we start notifies in our name."""
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
        try:
            notify.sendto(b"READY=1", address)
        except OSError:
            pass  # whoever asked is gone: we serve all the same


async def _run(sock: socket.socket, instances: str) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listener, instances, _notify_ready)
            async for _ in signals:  # a clean end: the socket file is removed
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
