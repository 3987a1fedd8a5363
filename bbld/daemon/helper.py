"""The daemon's forker: a single-threaded process with the engine imported once.

bbld starts it once (`python -m bbld.daemon.helper FD INSTANCES_DIR`) and sends it start
requests over a SOCK_SEQPACKET socket, each with its file descriptors (SCM_RIGHTS): the
instance's report channel, the caller's stdin, stdout, stderr and working directory. The
helper keeps one monitor forked ahead (no new interpreter), a spare that takes the next
request off that socket itself (_spare); the helper then forks the next spare. The monitor
takes the caller's stdio, cwd, fds and environment, makes the sandbox from the request's spec
or bubblewrap command line (bbld.bwrap.FrontEnd), runs the engine's Instance, serves the
control socket in INSTANCES_DIR (bbld.daemon.control), and reports `started` (layer pids and
namespaces) and `exited` (the main command's status) on the report channel. Monitors outlive
bbld and this helper. The namespace work never happens in the daemon's event loop.
"""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import socket
import sys
import time
from array import array

import msgspec

from bbld import bwrap, peer, spec
from bbld.daemon.control import Control
from bbld.daemon.messages import (
    INSTANCE_ID,
    MAX_EXTRA_FDS,
    MAX_REQUEST,
    REQUEST_FDS,
    Event,
    StartRequest,
)
from bbld.engine import Instance, StartError, prepare, seccomp
from bbld.engine.errors import EXIT_USAGE
from bbld.engine.syscalls import default_signal_actions

_request_decoder = msgspec.json.Decoder(StartRequest)



def main(fd: int, directory: str) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    sock = socket.socket(fileno=fd)
    _warm_up()
    failures = 0
    while failures < 3:  # (a spare that keeps dying would otherwise be forked forever)
        taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
        if os.fork() == 0:
            status = 1
            try:
                os.close(taken_r)
                status = _spare(sock, taken_w, directory)
            finally:
                os._exit(status)
        os.close(taken_w)
        word = os.read(taken_r, 1)
        os.close(taken_r)
        if word == _DAEMON_GONE:
            return 0
        failures = 0 if word == _TAKEN else failures + 1
    return 1


# What a spare tells the forker: it took a request (fork the next one), or the daemon is gone.
# Nothing (the pipe's end) means it died.
_TAKEN, _DAEMON_GONE = b"t", b"e"


def _spare(sock: socket.socket, taken_w: int, directory: str) -> int:
    """A monitor forked ahead of its request. It does a monitor's work once on sample
    requests while nothing waits for it, so that its copy-on-write faults (most of a fresh
    monitor's first milliseconds, see docs/performance.md) come before the request, then
    takes the next request off the daemon's socket itself and becomes that instance's
    monitor, after telling the forker to fork the next spare. Only the spare reads the
    socket: requests queue there while the next one is forked."""
    if not _pending(sock):  # (under a burst of requests, serve them cold rather than late)
        _rehearse()
    while True:  # (recv retries by itself when a signal interrupts it: PEP 475)
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, REQUEST_FDS + MAX_EXTRA_FDS,
                                                   socket.MSG_CMSG_CLOEXEC)
        if not data:
            _tell(taken_w, _DAEMON_GONE)
            return 0
        if len(fds) >= REQUEST_FDS:
            break
        for descriptor in fds:
            os.close(descriptor)
    _tell(taken_w, _TAKEN)
    sock.close()  # (the daemon's channel to the forker: not the instance's)
    return _monitor(data, fds, directory)


def _tell(taken_w: int, word: bytes) -> None:
    try:
        os.write(taken_w, word)
    except OSError:
        pass  # the forker is gone: bbld starts another for the next request
    os.close(taken_w)


def _pending(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return True  # (let recv_fds say what it is)


def _rehearse() -> None:
    """Decode and plan sample requests as _monitor would (no namespace, file or process is
    made), touching the memory a real request will touch. A failure here only means a
    colder start."""
    try:
        for data in _SAMPLE_REQUESTS:
            request = _request_decoder.decode(data)
            front = bwrap.FrontEnd(request.prog) if request.bwrap is not None else None
            sandbox = _sandbox(request, front)
            Instance(prepare(sandbox, request.args), request.env)
            msgspec.json.encode(Event(event="started", name=sandbox.name, command=["x"],
                                      started=time.time(), layers=[{"name": "x"}]))
    except Exception:  # noqa: BLE001 (a rehearsal: the real request reports its own errors)
        pass


_SAMPLE_REQUESTS = [
    msgspec.json.encode(StartRequest(
        id="0" * 8, env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        bwrap=["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--proc", "/proc",
               "--dev", "/dev", "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent",
               "--new-session", "--setenv", "A", "b", "--chdir", "/", "true"])),
    msgspec.json.encode(StartRequest(id="0" * 8, env={"HOME": "/"}, spec=msgspec.json.encode({
        "name": "sample", "layer": {
            "name": "outer", "namespaces": ["user", "mount", "pid", "ipc", "uts"],
            "uid": 0, "gid": 0, "new_root": True,
            "fs": [{"op": "ro-bind", "src": "/usr", "dest": "/usr"},
                   {"op": "symlink", "target": "usr/bin", "dest": "/bin"},
                   {"op": "proc", "dest": "/proc"}, {"op": "dev", "dest": "/dev"},
                   {"op": "tmpfs", "dest": "/tmp"}],
            "env": {"set": {"A": "b"}}, "seccomp": {"policy": "default"},
            "layers": [{"name": "inner", "namespaces": ["user", "mount", "pid"], "uid": 1000,
                        "gid": 1000,
                        "fs": [{"op": "tmpfs", "dest": "/run"}],
                        "command": {"argv": ["true"], "cwd": "/"}}]}}).decode())),
]


def _warm_up() -> None:
    """Do once here what every forked monitor would otherwise do again: msgspec builds a
    type's decoding and encoding tables on first use (about 5 ms for the spec's types), the
    default seccomp policy takes libseccomp 1.5 ms to compile, and objects the collector
    visits would be copied into every child (copy-on-write).
    """
    spec.decode(b'{"layer": {"name": "warm", "command": {"argv": ["true"]}}}', "json")
    # a first bubblewrap command line costs a fresh monitor 0.5 ms more than later ones
    bwrap.FrontEnd("bwrap").sandbox(["--ro-bind", "/", "/", "true"], {}, 0, 0, None)
    try:
        seccomp.compile_policy("default")
    except OSError:
        pass  # no libseccomp: the start that asks for a policy says so
    msgspec.json.encode(Event(event="exited", status=0))
    gc.freeze()


def _monitor(data: bytes, fds: list[int], directory: str) -> int:
    """One instance, in a forked child of the helper."""
    default_signal_actions(signal.SIGCHLD)
    home = peer.own_namespaces()  # (before the instance may join others: bwrap's --userns)
    # Out of the way first (high numbers), then everything to its place: stdio, extras.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
    for fd in fds:
        os.close(fd)
    report_fd, stdin, stdout, stderr, cwd, *extras = high
    report = socket.socket(fileno=report_fd)
    front = None  # a bubblewrap command line's, which words our errors
    try:
        request = _request_decoder.decode(data)
        if len(extras) != len(request.fd_numbers):
            raise ValueError("the number of fds does not match fd_numbers")
        for target, source in zip((0, 1, 2, *request.fd_numbers), (stdin, stdout, stderr,
                                                                    *extras), strict=True):
            os.dup2(source, target)
        os.fchdir(cwd)
        for descriptor in (stdin, stdout, stderr, cwd, *extras):
            os.close(descriptor)
        if not INSTANCE_ID.fullmatch(request.id):
            raise ValueError(f"bad instance id {request.id!r}")
        front = bwrap.FrontEnd(request.prog) if request.bwrap is not None else None
        plan = prepare(_sandbox(request, front), request.args)
        started = time.time()
        # The caller's environment goes to layer 1 as data; os.environ stays bbld's (making
        # it the caller's, one putenv per variable, took 1.5 ms).
        instance = Instance(plan, request.env)
        instance.start()
    except bwrap.Done as done:  # --help, --version, or a bad command line: already said
        _send(report, Event(event="exited", status=done.status))
        return 0
    except spec.SpecError as exc:
        return _failed(report, front, "\n".join(exc.problems), 2)
    except StartError as exc:
        return _failed(report, front, str(exc), exc.exit_code)
    except (msgspec.DecodeError, ValueError, OSError) as exc:
        return _failed(report, front, f"bad start request: {exc}", 1)
    layers = instance.layers_info()
    main = plan.main
    entry = {"id": request.id, "name": plan.sandbox.name, "command": main.layer.command.argv,
             "started": started, "layers": layers,
             "single_instance": plan.sandbox.single_instance}
    try:
        control = Control(instance, directory, entry, home)
    except OSError as exc:  # unreachable, it would be invisible:
        instance.signal(signal.SIGKILL)  # no instance rather than one nobody can list
        instance.wait()
        return _failed(report, front, f"cannot make the instance's control socket in "
                                      f"{directory}: {exc.strerror}", 1)
    own = os.pidfd_open(os.getpid())  # the daemon signals the instance through its monitor
    tty = [instance.main_tty] if instance.main_tty is not None else []
    if request.hold_tty and tty:  # detached: the terminal stays open here, its output unread
        instance.watch(tty[0], lambda: _discard(tty[0]))
        tty = []
    _send(report, Event(event="started", name=entry["name"], command=entry["command"],
                        started=started, main_pid=instance.main_pid, layers=layers,
                        tty=bool(tty), die_with_parent=plan.sandbox.die_with_parent),
          [own, *tty])
    os.close(own)
    for fd in tty:  # the caller's now: when it closes, the sandbox's terminal hangs up
        os.close(fd)
        instance.main_tty = None
    status = None
    try:
        status = instance.wait()
    except StartError as exc:
        return _failed(report, front, str(exc), exc.exit_code)
    finally:
        control.close(status)
    _send(report, Event(event="exited", status=status))
    return 0


def _sandbox(request: StartRequest, front: bwrap.FrontEnd | None) -> spec.Sandbox:
    """The request's spec, or its bubblewrap command line interpreted here, where the
    caller's fds, cwd and environment are (raises bwrap.Done once it has said why not).
    The caller's fds the command line does not name are closed."""
    callers = {0, 1, 2, *request.fd_numbers}  # (the monitor's own fds are not the caller's)
    if front is None:
        sandbox = spec.decode(request.spec, "json", "request")
    else:
        received = {number: _identity(number) for number in request.fd_numbers}
        sandbox = front.sandbox(request.bwrap, request.env, os.getuid(), os.getgid(),
                                request.name, callers)
        for number in received.keys() - spec.caller_fds(sandbox):
            if _identity(number) == received[number]:  # (not one the parse read and closed)
                os.close(number)
    missing = sorted(spec.caller_fds(sandbox) - callers)
    if missing:
        raise StartError(f"fd {missing[0]} is not open", EXIT_USAGE)
    return sandbox


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        status = os.fstat(fd)
        return status.st_dev, status.st_ino
    except OSError:
        return None


def _failed(report: socket.socket, front: bwrap.FrontEnd | None, message: str,
            code: int) -> int:
    """Report a failed start; a bubblewrap command line's caller reads it on its stderr
    first, in bubblewrap's words and with its status (1)."""
    if front is not None:
        front.start_failed(message)
        code = 1
    _send(report, Event(event="failed", message=message, exit_code=code,
                        reported=front is not None))
    return 0


def _discard(fd: int) -> None:
    """Read what a detached instance writes to its terminal, so that it never blocks."""
    try:
        os.read(fd, 65536)
    except OSError:
        pass


def _send(report: socket.socket, event: Event, fds: list[int] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
    try:
        report.sendmsg([msgspec.json.encode(event)], ancillary)
    except OSError:
        pass  # the daemon is gone; the instance goes on regardless


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
