"""Talking to bbld: connect (starting the daemon when nothing listens) and make Varlink calls.

Plain blocking sockets (bblctl.wire): the client imports neither trio nor msgspec nor the
engine, because every command pays for its imports. When no daemon
answers, the first client takes a lock in the user's state directory, starts `bbld` fully
detached (its own session, logging to the state directory) and waits for its READY=1; other
clients starting at the same moment wait on the same lock and then find the daemon running,
so ten simultaneous clients yield one daemon.
"""

import fcntl
import os
import sys
import time

from bblctl import wire
from bblctl.wire import signal
from bbld import paths, peer
from bbld.framing import Framer, FrameTooLarge

START_TIMEOUT = 10.0  # seconds for a freshly started bbld to accept connections
MAX_REPLY = 1 << 26  # bytes; a daemon that says more than this is not one we understand


class ClientError(Exception):
    """Talking to the daemon failed; the message says why and what to do."""


class RemoteError(ClientError):
    """The daemon answered with a Varlink error."""

    def __init__(self, name: str, parameters: dict):
        super().__init__(f"{name} {parameters}" if parameters else name)
        self.name = name
        self.parameters = parameters


class Sandboxed(ClientError):
    """We run inside a sandbox, where bbld does not serve (it refused us, or none is in
    reach and we may not start one): bbl-bwrap and bblctl run nest instead (bbld.peer)."""


INITIAL_USER_NAMESPACE = 0xEFFFFFFD  # the kernel's fixed inode number of the first one


def sandboxed() -> bool:
    """Whether this process runs inside a sandbox, as far as it can tell on its own: in a
    user namespace other than the host's first one, or (where pid 1's can be read: root) in
    another mount namespace than pid 1. bbld's own check (bbld.peer) is the one that counts;
    this one decides whether a client may start a daemon when none answers."""
    try:
        if os.stat("/proc/self/ns/user").st_ino != INITIAL_USER_NAMESPACE:
            return True
        own = os.stat("/proc/self/ns/mnt")
    except OSError:
        return True  # no /proc of our own to tell: a sandbox
    try:
        first = os.stat("/proc/1/ns/mnt")
    except OSError:
        return False  # (not ours to read: an ordinary user's session)
    return (first.st_dev, first.st_ino) != (own.st_dev, own.st_ino)


SANDBOXED = "bbld does not serve inside a sandbox"


class Connection:
    def __init__(self, sock):
        self.sock = sock
        self.framer = Framer(MAX_REPLY)
        self.pending: list[bytes] = []
        self.fds: list[int] = []  # fds that came with replies (SCM_RIGHTS); the caller's now

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method: str, fds: tuple[int, ...] = (), **parameters) -> dict:
        """One call, one reply. Raises RemoteError for an error reply."""
        self._send({"method": method, "parameters": parameters}, fds)
        reply = self._next_reply()
        if reply.get("error") is not None:
            self._raise(reply)
        return reply.get("parameters") or {}

    def stream(self, method: str, fds: tuple[int, ...] = (), **parameters):
        """A `more` call, sent now: returns an iterator over each reply's parameters until
        the last one. Once this returns, the daemon holds its own copies of `fds`."""
        self._send({"method": method, "parameters": parameters, "more": True}, fds)
        return self._replies()

    def _replies(self):
        while True:
            reply = self._next_reply()
            if reply.get("error") is not None:
                self._raise(reply)
            yield reply.get("parameters") or {}
            if not reply.get("continues"):
                return

    def _send(self, call: dict, fds: tuple[int, ...]) -> None:
        """A Varlink message: one JSON object and a NUL byte."""
        wire.send(self.sock, wire.dumps(call).encode() + b"\0", fds)

    @staticmethod
    def _raise(reply: dict) -> None:
        name, parameters = reply["error"], reply.get("parameters") or {}
        if name == "io.bbl.Manager.PermissionDenied" and parameters.get("sandboxed"):
            raise Sandboxed(f"{SANDBOXED}: {parameters.get('reason', 'refused')}; "
                            "run bblctl outside it")
        raise RemoteError(name, parameters)

    def _next_reply(self) -> dict:
        while not self.pending:
            data, fds = wire.receive(self.sock, 65536, 4)
            self.fds.extend(fds)
            if not data:
                raise ClientError("bbld closed the connection")
            try:
                self.pending.extend(self.framer.feed(data))
            except FrameTooLarge as exc:
                raise ClientError(f"bbld sent a reply too large: {exc}") from None
        try:
            reply = wire.loads(self.pending.pop(0).decode())
        except (wire.ProtocolError, UnicodeDecodeError) as exc:
            raise ClientError(f"bbld sent something that is not JSON: {exc}") from None
        if not isinstance(reply, dict):
            raise ClientError("bbld sent a reply that is not a JSON object")
        return reply


def connect(autostart: bool = True) -> Connection:
    """A connection to bbld, started first if none answers (never from inside a sandbox:
    it would run there, and outlive the sandbox's command). Raises Sandboxed there."""
    path = paths.socket_path()
    sock = _try_connect(path)
    if sock is None and sandboxed():
        raise Sandboxed(f"{SANDBOXED} and is not started from one; run bblctl outside it")
    if sock is None and autostart:
        sock = _start_daemon(path)
    if sock is None:
        raise ClientError(f"no bbld listens on {path}; start it with `bbld`")
    return Connection(sock)


def running_daemon() -> Connection | None:
    """A connection to bbld if it runs; None (and no daemon started) if not."""
    try:
        return connect(autostart=False)
    except ClientError:
        return None


def connect_at(path: str) -> Connection | None:
    """A connection to the bbld listening at `path` (checked as connect() checks), or None
    if nothing listens there; never starts one."""
    sock = _try_connect(path)
    return None if sock is None else Connection(sock)


def _try_connect(path: str):
    """A connection to what listens at `path`, once it proved to be the user's bbld (see
    _verify); None if nothing listens."""
    sock = wire.unix_socket()
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise ClientError(f"cannot connect to {path}: {exc.strerror}") from None
    try:
        _verify(sock, path)
    except ClientError:
        sock.close()
        raise
    return sock


def _verify(sock, path: str) -> None:
    """Before a byte of ours goes out (our environment, stdio, fds): the server must be our
    uid in our own user and mount namespaces, the same check bbld makes of us (bbld.peer).
    Anyone else listening there (another user, where the socket's directory is shared; a
    sandbox that could write the runtime directory) gets nothing. From inside a sandbox the
    real bbld fails it too: we are the one in other namespaces (Sandboxed)."""
    try:
        peer.check(sock, peer.own_namespaces(), "its server", "this client")
    except peer.Refused as refused:
        if refused.uid != os.getuid():
            raise ClientError(f"{path} is served by uid {refused.uid}, not by you: remove it "
                              "(another user made it)") from None
        if sandboxed():
            raise Sandboxed(f"{SANDBOXED}; run bblctl outside it") from None
        raise ClientError(f"{path} is not your bbld: {refused.reason}; remove it") from None


def _start_daemon(path: str):
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


class SignalForwarder:
    """While active, the signals a client receives go to an instance's main command (or, aimed
    with `pid`, to a process Exec started); those that come before the target is known wait
    for it. Signals the client ignores (nohup) stay ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.target: dict | None = None
        self.early: list[int] = []
        self.previous: dict = {}

    def __enter__(self):
        for signo in self.SIGNALS:
            if signal.getsignal(signo) != signal.SIG_IGN:
                self.previous[signo] = signal.signal(signo, self._received)
        return self

    def __exit__(self, *exc):
        for signo, handler in self.previous.items():
            signal.signal(signo, handler)

    def aim(self, **target) -> None:
        """Send to `target` (Signal's id, and pid) from now on, starting with the early ones."""
        self.target = target
        while self.early:
            self._send(self.early.pop(0))

    ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def _received(self, signo, _frame) -> None:
        if self.target is not None:
            self._send(signo)
        elif signo in self.ENDING and any(early in self.ENDING for early in self.early):
            # A second one before the sandbox even started (it waits on --block-fd, say):
            # the caller means it. Die of it, as bwrap would have of the first.
            signal.signal(signo, signal.SIG_DFL)
            os.kill(os.getpid(), signo)
        else:
            self.early.append(signo)

    def _send(self, signo: int) -> None:
        try:
            with connect(autostart=False) as conn:
                conn.call("io.bbl.Manager.Signal", signal=signo, **self.target)
        except ClientError:
            pass  # it ended meanwhile
