"""The daemon's forker: a single-threaded process with the engine imported once.

bbld starts it once (`python -m bbld.daemon.helper FD INSTANCES_DIR`) and sends it start
requests over a SOCK_SEQPACKET socket, each with its file descriptors (SCM_RIGHTS): the
instance's report channel, the caller's stdin, stdout, stderr and working directory. For
every request the helper forks a monitor (no new interpreter): the monitor takes the caller's
stdio, cwd, fds and environment, makes the sandbox from the request's spec or bubblewrap
command line (bbld.bwrap.FrontEnd), runs the engine's Instance, serves the control socket
in INSTANCES_DIR (bbld.daemon.control), and reports `started` (layer pids and namespaces)
and `exited` (the main command's status) on the report channel. Monitors outlive bbld and
this helper. The namespace work never happens in the daemon's event loop.
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

from bbld import bwrap, spec
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

_request_decoder = msgspec.json.Decoder(StartRequest)



def main(fd: int, directory: str) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    sock = socket.socket(fileno=fd)
    _warm_up()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST,
                                                       REQUEST_FDS + MAX_EXTRA_FDS,
                                                       socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            continue
        if not data:
            return 0  # the daemon is gone
        if len(fds) < REQUEST_FDS:
            for descriptor in fds:
                os.close(descriptor)
            continue
        if os.fork() == 0:
            status = 1
            try:
                status = _monitor(data, fds, directory)
            finally:
                os._exit(status)
        for descriptor in fds:
            os.close(descriptor)


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
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
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
    control = Control(instance, directory, entry)
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
    if front is None:
        return spec.decode(request.spec, "json", "request")
    received = {number: _identity(number) for number in request.fd_numbers}
    sandbox = front.sandbox(request.bwrap, request.env, os.getuid(), os.getgid(),
                            request.name)
    for number in received.keys() - spec.caller_fds(sandbox):
        if _identity(number) == received[number]:  # (not one the parse read and closed)
            os.close(number)
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
