"""Starting bbld when no daemon answers (bblctl.client.connect): the first client takes a lock
in the user's state directory, starts `bbld` fully detached (its own session, logging to the
state directory) and waits for its READY=1; other clients starting at the same moment wait on
the same lock and then find the daemon running, so ten simultaneous clients yield one daemon.
Only loaded when it is needed."""

import fcntl
import os
import sys
import time

from bblctl import wire
from bblctl.client import ClientError, _try_connect
from bbld import paths

START_TIMEOUT = 10.0  # seconds for a freshly started bbld to accept connections


def start_daemon(path: str):
    """Start bbld, once for all the clients that try at the same moment; a connection to it."""
    try:
        directory = paths.private_directory(paths.state_dir())
    except paths.UnsafeDirectory as exc:
        raise ClientError(f"cannot start bbld: {exc}") from None
    except OSError as exc:
        raise ClientError(f"cannot start bbld: {paths.state_dir()}: {exc.strerror}") from None
    lock = os.open(os.path.join(directory, "autostart.lock"),
                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others wait here
        sock = _try_connect(path)  # someone else may have started it meanwhile
        if sock is not None:
            return sock
        log = os.path.join(directory, "bbld.log")
        sock = _spawn_and_wait(path, log)
        if sock is None:
            raise ClientError(f"bbld did not start; see {log}")
        return sock
    finally:
        os.close(lock)


# What an autostarted bbld keeps of our environment: where the user's directories are, the
# locale, and BBL's own settings. Nothing else (LD_PRELOAD, PYTHONPATH, tokens): it serves
# every later client, and each sandbox gets its caller's environment as data anyway.
DAEMON_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ",
                      "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")


def daemon_environment(environ) -> dict[str, str]:
    return {name: value for name, value in environ.items() if name in DAEMON_ENVIRONMENT
            or name.startswith(("LC_", "BBL_"))}


def _spawn_and_wait(path: str, log: str):
    """Start bbld (isolated: `python -I`, DAEMON_ENVIRONMENT only) and wait, without
    polling, until it says READY=1 (sd_notify, on a datagram socket of ours) or ends; then
    connect. None if it ended or timed out. The socket's name is visible to everyone in
    /proc/net/unix, so only bbld's own datagram counts: the kernel vouches for the sender's
    pid (SCM_CREDENTIALS)."""
    import select  # (autostart only)

    socket = wire.socket
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        name = f"bbl-notify-{os.getpid()}-{os.urandom(8).hex()}"  # abstract: nothing to remove
        notify.bind(f"\0{name}")
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        pid = _spawn_detached([sys.executable, "-I", "-m", "bbld.daemon.main"], log,
                              {**daemon_environment(os.environ), "NOTIFY_SOCKET": f"@{name}"})
        try:
            daemon = os.pidfd_open(pid)
        except OSError:
            return None  # it ended already
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while (left := deadline - time.monotonic()) > 0:
                ready = select.select([notify, daemon], [], [], left)[0]
                if notify in ready and _notified_by(notify, pid):
                    return _try_connect(path)
                if daemon in ready:
                    return _try_connect(path)  # ended: maybe another bbld serves the socket
            return None
        finally:
            os.close(daemon)
    finally:
        notify.close()


def _notified_by(notify, pid: int) -> bool:
    """Whether the datagram waiting on `notify` is READY=1 from process `pid`."""
    socket = wire.socket
    data, ancillary, _flags, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
    for level, kind, record in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(record) >= 12:
            sender = int.from_bytes(record[:4], sys.byteorder, signed=True)
            return sender == pid and b"READY=1" in data.split(b"\n")
    return False


def _spawn_detached(argv: list[str], log: str, env: dict[str, str]) -> int:
    """Start argv in its own session, reparented away from us (double fork), with `env`.
    Returns its pid."""
    pid_r, pid_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(pid_r)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                os.chdir("/")
                null = os.open(os.devnull, os.O_RDONLY)
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                              0o600)
                os.dup2(null, 0)
                os.dup2(out, 1)
                os.dup2(out, 2)
                os.closerange(3, 1 << 16)
                os.execve(argv[0], argv, env)
            os.write(pid_w, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(pid_w)
    os.waitpid(child, 0)
    with os.fdopen(pid_r) as f:
        return int(f.read() or 0)
