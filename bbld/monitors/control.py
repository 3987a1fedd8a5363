"""An instance's control socket, served by its monitor (synchronous; no trio).

Every running instance has a monitor: the process that started it with the engine and
follows it to its end (bbld.monitors.monitor). The monitor listens on
`RUNTIME/instances/ID.sock` (SOCK_SEQPACKET, in the 0700 runtime directory), so the instance
stays reachable when bbld itself dies: a new bbld finds the sockets and re-adopts the
instances. One request per connection, JSON (ControlRequest); replies are ControlReply.

  status            -> status (the registry entry)
  watch             -> exited (when the instance ends; the connection stays open until then)
  signal            -> ok, after sending `signal` to the main command (through layer 1) or to
                       a process this instance's exec started (`pid`); with `hangup`, the
                       app's terminal is hung up too if the main command ignores `signal`
                       (stop: an interactive shell ignores SIGTERM)
  exec (+3 fds)     -> started (pid; with the pty master fd if `tty`), then exited (status);
                       the process dies if the connection closes first
  send-args (+3 fds) -> the same, for the command that hands `args` to the instance (the
                       spec's send_args template, or the main program with the arguments)
  attach            -> started (with the client's end of the app's terminal: bbld.console),
                       then exited (status), as for watch; error (parameter "terminal") if
                       the app has no terminal

When the instance ends the monitor writes ID.exited (the final entry) for a bbld that was not
there to see it, answers every watcher, and removes its socket.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import msgspec

from bbld import channel, peer
from bbld.engine import StartError
from bbld.engine import syscalls as sc
from bbld.messages import CONTROL_FDS, MAX_CONTROL, ControlReply, ControlRequest
from bbld.spec import send_args_argv


def socket_name(directory: str, instance_id: str) -> str:
    return os.path.join(directory, f"{instance_id}.sock")


def send(sock: socket.socket, message, fds: list[int] = ()) -> None:
    channel.send(sock, msgspec.json.encode(message), fds)


class Control:
    """The monitor's control server, driven by the instance's poll loop (Instance.watch)."""

    def __init__(self, instance, directory: str, entry: dict, home: peer.Identity):
        self.instance = instance
        self.home = home  # the namespaces a requester must be in (bbld.peer)
        self.entry = entry  # id, name, command, started, pid, layers
        self.path = socket_name(directory, entry["id"])
        self.directory = directory
        self.watchers: list[socket.socket] = []
        self.execs: dict[int, tuple[int, socket.socket]] = {}  # pid -> (pidfd, connection)
        self.console = None  # the app's terminal, if it has one (bbld.monitors.console)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                os.mkdir(directory, 0o700)  # (again, if it went: an instance must be reachable)
            except FileExistsError:
                pass
            old_umask = os.umask(0o177)
            try:
                with channel.Address(self.path) as address:
                    self.listener.bind(address)
            finally:
                os.umask(old_umask)
        except OSError:
            self.listener.close()
            raise
        self.listener.listen(16)
        self.listener.setblocking(False)
        instance.watch(self.listener.fileno(), self._accept)

    # ------------------------------------------------------------ requests

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        refused = None
        try:
            peer.check(conn, self.home)
        except peer.Refused as exc:
            refused = exc
        conn.setblocking(False)  # its request is read when it arrives: a silent peer costs
        self.instance.watch(conn.fileno(), lambda: self._request(conn) if refused is None
                            else self._refuse(conn, refused))  # nothing

    def _refuse(self, conn: socket.socket, refused: peer.Refused) -> None:
        """Read the request (closing what fds came with it) before the refusal, so that the
        requester gets the reply rather than a reset for unread data."""
        self.instance.unwatch(conn.fileno())
        try:
            channel.close_all(channel.receive(conn, MAX_CONTROL, CONTROL_FDS)[1])
        except (OSError, channel.Truncated):
            pass
        _reply(conn, ControlReply(op="error", message=f"permission denied: {refused}"))
        conn.close()

    def _request(self, conn: socket.socket) -> None:
        self.instance.unwatch(conn.fileno())
        try:
            data, fds = channel.receive(conn, MAX_CONTROL, CONTROL_FDS)
            conn.setblocking(True)
            conn.settimeout(5)  # replies are small; a peer that stops reading is dropped
            self._handle(conn, data, fds)
        except (OSError, msgspec.DecodeError, ValueError) as exc:
            _reply(conn, ControlReply(op="error", message=str(exc),
                                      parameter=getattr(exc, "parameter", None)))
            conn.close()

    def _handle(self, conn: socket.socket, data: bytes, fds: list[int]) -> None:
        request = msgspec.json.decode(data, type=ControlRequest)
        if request.op not in ("exec", "send-args") and fds:
            _close(fds)
            raise ValueError("file descriptors sent with a request that takes none")
        if request.op == "status":
            _reply(conn, ControlReply(op="status", entry=self.status()))
            conn.close()
        elif request.op == "watch":
            conn.settimeout(None)
            self.watchers.append(conn)
            self.instance.watch(conn.fileno(), lambda: self._watcher_gone(conn))
        elif request.op == "signal":
            self._signal(request)
            _reply(conn, ControlReply(op="ok"))
            conn.close()
        elif request.op == "exec":
            self._exec(conn, request, fds)
        elif request.op == "attach":
            self._attach(conn)
        elif request.op == "send-args":  # exec of the command the spec says takes them
            argv = send_args_argv(self.instance.plan.sandbox, request.args)
            self._exec(conn, ControlRequest(op="exec", argv=argv), fds)
        else:
            raise ValueError(f"unknown request {request.op!r}")

    def status(self) -> dict:
        return {**self.entry, "pid": self.instance.main_pid, "state": "running",
                "status": None}

    def _watcher_gone(self, conn: socket.socket) -> None:
        self.instance.unwatch(conn.fileno())
        self.watchers.remove(conn)
        conn.close()

    def _signal(self, request: ControlRequest) -> None:
        if not 1 <= request.signal <= 64:
            raise BadParameter("signal", f"no such signal {request.signal}")
        if request.pid is not None and request.pid not in self.execs:
            raise BadParameter("pid", f"pid {request.pid} was not started by exec in this "
                                      "instance")
        if request.pid is None and self.instance.status is not None:
            return  # it has just ended (its end and this request came in one poll)
        if request.pid is None:
            self.instance.signal(request.signal)
            if request.hangup and self.console is not None \
                    and _ignores(self.instance.main_pid, request.signal):
                self.console.hang_up()  # (an interactive shell: what ends it)
            return
        try:
            sc.pidfd_send_signal(self.execs[request.pid][0], request.signal)
        except ProcessLookupError:
            pass  # ended, not yet reaped: what the signal was for has happened

    def _exec(self, conn: socket.socket, request: ControlRequest, fds: list[int]) -> None:
        try:
            if len(fds) != (0 if request.tty else 3):
                raise ValueError("exec takes stdin, stdout and stderr, or tty")
            entered = self.instance.enter(request.layer, request.argv,
                                          None if request.tty else tuple(fds))
        except StartError as exc:
            _reply(conn, ControlReply(op="error", message=str(exc), exit_code=exc.exit_code))
            conn.close()
            return
        finally:
            _close(fds)
        pid = entered.pid
        try:
            _reply(conn, ControlReply(op="started", pid=pid),
                   [entered.master] if entered.master is not None else [])
        finally:
            if entered.master is not None:
                os.close(entered.master)
        conn.settimeout(None)
        self.execs[pid] = (entered.pidfd, conn)
        self.instance.watch(entered.pidfd, lambda: self._exec_ended(pid))
        self.instance.watch(conn.fileno(), lambda: self._exec_hung_up(pid))

    def _attach(self, conn: socket.socket) -> None:
        """A new client of the app's terminal: started (its end of the terminal's socket),
        then, like a watcher, exited when the instance ends."""
        if self.console is None:
            raise BadParameter("terminal", "the app has no terminal of its own (it was not "
                                           "started on one)")
        try:
            fd = self.console.attach()
        except OSError:
            raise BadParameter("terminal", "the app's terminal has closed") from None
        try:
            _reply(conn, ControlReply(op="started", pid=self.instance.main_pid), [fd])
        finally:
            os.close(fd)
        conn.settimeout(None)
        self.watchers.append(conn)
        self.instance.watch(conn.fileno(), lambda: self._watcher_gone(conn))

    def _exec_ended(self, pid: int) -> None:
        pidfd, conn = self.execs.pop(pid)
        status = self.instance.reap(pidfd)
        code = status.si_status if status.si_code == os.CLD_EXITED else 128 + status.si_status
        self.instance.unwatch(pidfd)
        self.instance.unwatch(conn.fileno())
        os.close(pidfd)
        _reply(conn, ControlReply(op="exited", pid=pid, status=code))
        conn.close()

    def _exec_hung_up(self, pid: int) -> None:
        """The requester went away: so does what it started (its exit is reaped as usual)."""
        pidfd, conn = self.execs[pid]
        self.instance.unwatch(conn.fileno())
        _kill_session(pid, pidfd)

    # ------------------------------------------------------------ the end

    def close(self, status: int | None, cause: str | None = None) -> None:
        """The instance ended (`cause`: a limit ended it): record it, tell the watchers,
        remove the socket."""
        final = {**self.entry, "pid": None, "state": "exited", "status": status,
                 "ended": time.time(), **({"cause": cause} if cause else {})}
        self._record_end(msgspec.json.encode(final))
        for pid in list(self.execs):
            pidfd, conn = self.execs.pop(pid)
            _kill_session(pid, pidfd)
            try:
                self.instance.reap(pidfd)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(pidfd)
            conn.close()
        for conn in self.watchers:
            _reply(conn, ControlReply(op="exited", status=status, message=cause))
            conn.close()
        self.watchers.clear()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.listener.close()


    def _record_end(self, final: bytes) -> None:
        """ID.exited, for a bbld that was not there to see the end: written to a new file
        (never through whatever another process put at its name), then renamed."""
        temporary = os.path.join(self.directory, f".{self.entry['id']}.exited")
        try:
            try:
                os.unlink(temporary)  # (a link planted there goes, not what it points to)
            except FileNotFoundError:
                pass
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.write(final)
            os.rename(temporary, os.path.join(self.directory, f"{self.entry['id']}.exited"))
        except OSError:
            pass  # bbld follows the instance anyway; only a later bbld misses its status


class BadParameter(ValueError):
    """A request's field (`parameter`) is wrong; the requester hears which."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter


def _ignores(pid: int | None, signo: int) -> bool:
    """Whether process `pid` ignores signal `signo` (SIG_IGN), as /proc/PID/status says."""
    try:
        with open(f"/proc/{pid}/status") as status:
            ignored = next(line for line in status if line.startswith("SigIgn:"))
    except (OSError, StopIteration):
        return False
    return bool(int(ignored.split()[1], 16) >> (signo - 1) & 1)


def _kill_session(pid: int, pidfd: int) -> None:
    """SIGKILL an exec'd command and its process group (it leads its own session and group).
    Not reaped yet, its pid cannot have been reused for another group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        sc.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reply(conn: socket.socket, reply: ControlReply, fds: list[int] = ()) -> None:
    try:
        send(conn, reply, fds)
    except OSError:
        pass  # the requester is gone


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)
