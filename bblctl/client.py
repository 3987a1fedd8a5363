"""Talking to bbld: connect (starting the daemon when nothing listens) and make Varlink calls.

Plain blocking sockets (bblctl.wire): the client imports neither trio nor msgspec nor the
engine, because every command pays for its imports. Before it sends anything, the client
checks that the user's bbld is what answers (bbld.peer). When none answers, bblctl.autostart
starts one.
"""

import os

from bblctl import wire
from bblctl.wire import signal
from bbld import channel, paths, peer

MAX_REPLY = 1 << 26  # bytes; a daemon that says more than this is not one we understand
REPLY_FDS = 4  # fds a reply may carry (Exec's and Run's pty master: one)


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
        self.framer = channel.Framer(MAX_REPLY)
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
        channel.send_all(self.sock, wire.dumps(call).encode() + b"\0", fds)

    @staticmethod
    def _raise(reply: dict) -> None:
        name, parameters = reply["error"], reply.get("parameters") or {}
        if name == "io.bbl.Manager.PermissionDenied" and parameters.get("sandboxed"):
            raise Sandboxed(f"{SANDBOXED}: {parameters.get('reason', 'refused')}; "
                            "run bblctl outside it")
        raise RemoteError(name, parameters)

    def _next_reply(self) -> dict:
        while not self.pending:
            try:
                data, fds = channel.receive(self.sock, 65536, REPLY_FDS)
            except channel.Truncated as exc:
                raise ClientError(f"bbld sent {exc}") from None
            self.fds.extend(fds)
            if not data:
                raise ClientError("bbld closed the connection")
            try:
                self.pending.extend(self.framer.feed(data))
            except channel.FrameTooLarge as exc:
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
        from bblctl.autostart import start_daemon  # (only when none answers)

        sock = start_daemon(path)
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
        with channel.Address(path) as address:
            sock.connect(address)
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


def die_with_parent(parent: int) -> None:
    """bwrap's --die-with-parent for this client: SIGKILL when `parent` (our parent when we
    started) dies, at once if it already has. Our end ends the instance (die_with_client).
    A thread waits on the parent's pidfd (what PR_SET_PDEATHSIG does, without the ctypes
    import that would cost every such start 2 ms)."""
    import _thread
    import select

    try:
        pidfd = os.pidfd_open(parent)
    except OSError:
        pidfd = None  # (gone already)
    if pidfd is None or os.getppid() != parent:  # (the pidfd is of our parent, not a reuse)
        os.kill(os.getpid(), signal.SIGKILL)

    def wait_for_its_end():
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has ended
        poller.poll()
        os.kill(os.getpid(), signal.SIGKILL)

    _thread.start_new_thread(wait_for_its_end, ())


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
