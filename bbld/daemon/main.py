"""`bbld`: run the daemon in the foreground (systemd runs it so).

It listens on the socket systemd passes (LISTEN_FDS) or on its own at
$XDG_RUNTIME_DIR/bbl/bbld.sock (see bbld.paths), tells systemd READY=1 when NOTIFY_SOCKET is
set, and removes its socket when it ends. A lock in the runtime directory makes sure that only
one bbld serves it (flock on the directory itself: nothing is left behind).
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import socket
import sys

import trio

from bbld import __version__, cgroupfs, channel, paths
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
        place, listener, cleanup = _take_place(socket_path)
    except (paths.UnsafeDirectory, CannotServe) as exc:
        print(f"bbld: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"bbld: cannot listen on {socket_path or paths.socket_path()}: {exc.strerror}",
              file=sys.stderr)
        return 1
    _raise_fd_limit()
    cgroupfs.claim()  # (before the forker starts: the monitors inherit BBL_CGROUP)
    try:
        trio.run(_run, listener, place)
    finally:
        cleanup()
    return 0


def _take_place(socket_path: str | None):
    """The runtime directory this bbld serves, its listening socket, and what to undo at the
    end. A socket systemd passed says where (its own path), never the environment; either
    way bbld takes the directory's lock first (only one bbld serves a directory) and
    afterwards removes only what it made: its own socket, and `instances/` if it is empty."""
    activated = _activated_socket()
    if activated is not None:
        path = activated.getsockname()
        if not isinstance(path, str) or not path.startswith("/"):
            activated.close()
            raise CannotServe("the socket systemd passed has no path: use ListenStream=PATH")
        directory = paths.ensure_runtime_dir(os.path.dirname(path))
    else:
        directory = paths.ensure_runtime_dir(os.path.dirname(socket_path) if socket_path
                                             else None)
        path = socket_path or os.path.join(directory, "bbld.sock")
    lock = _lock(directory, path)
    made = []
    try:
        instances = paths.private_directory(os.path.join(directory, "instances"), closed=0o077)
        if activated is None:
            listener = _listen(path)
            made.append(path)
        else:
            listener = activated
    except BaseException:
        os.close(lock)
        raise

    def cleanup():
        listener.close()
        for made_path in made:
            try:
                os.unlink(made_path)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(instances)  # only when no instance is left in it
        except OSError:
            pass
        os.close(lock)  # (last: until then no other bbld may take the directory)

    started_by = "socket activation" if activated is not None else \
        "autostart" if os.environ.get("NOTIFY_SOCKET", "").startswith("@bbl-notify-") else \
        "by hand"
    place = server.Place(runtime=directory, socket=path, instances=instances,
                         started_by=started_by, history=_history_file())
    return place, listener, cleanup


def _history_file() -> str | None:
    """Where ended instances are kept (bbld.daemon.history): in the state directory, if
    that is one only the user can change; else none is kept, and the log says why."""
    try:
        return os.path.join(paths.private_directory(paths.state_dir()), "history.jsonl")
    except (paths.UnsafeDirectory, OSError) as exc:
        print(f"bbld: no history of ended instances: {exc}", file=sys.stderr)
        return None


def _lock(directory: str, path: str) -> int:
    """flock on the directory itself (no lock file to leave behind). Held: CannotServe,
    naming the bbld that holds it."""
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        pid = _pid_of_daemon(os.path.join(directory, "bbld.sock"))
        who = f"another bbld (pid {pid})" if pid else "another bbld"
        raise CannotServe(f"{who} already serves {directory} (socket "
                             f"{os.path.join(directory, 'bbld.sock')}); stop it with "
                             "`bblctl daemon stop`") from None
    return lock


def _pid_of_daemon(path: str) -> int | None:
    """The pid a bbld at `path` says it has (Ping), or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.settimeout(2)
            with channel.Address(path) as address:
                probe.connect(address)
            probe.sendall(b'{"method": "io.bbl.Manager.Ping"}\0')
            reply = b""
            while not reply.endswith(b"\0") and (chunk := probe.recv(4096)):
                reply += chunk
        return int(json.loads(reply.rstrip(b"\0"))["parameters"]["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _raise_fd_limit() -> None:
    """Every running instance holds a few of bbld's fds (its monitor's pidfd, a connection to
    its control socket): take the hard limit, not the soft default of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class CannotServe(Exception):
    """bbld cannot serve here; the message says why and what to do."""


def _activated_socket() -> socket.socket | None:
    """The listening socket systemd passed, if it passed one to us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or \
            int(os.environ.get("LISTEN_FDS", "0")) < 1:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    os.set_inheritable(sock.fileno(), False)
    return sock


def _listen(path: str) -> socket.socket:
    try:
        os.unlink(path)  # a stale socket: whoever made it no longer holds the lock
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the socket is created 0600
    try:
        with channel.Address(path) as address:
            sock.bind(address)
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


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


async def _run(sock: socket.socket, place) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, listener, place, _notify_ready, None,
                               nursery.cancel_scope)
            async for _ in signals:  # a clean end: the socket file is removed
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
