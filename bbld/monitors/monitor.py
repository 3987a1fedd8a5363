"""An instance's monitor: the process that makes one sandbox and follows it to its end.

A spare of the forker (bbld.monitors.forker) becomes one when it takes a start request off
bbld's channel: run() takes over the caller's stdio, fds, cwd and environment, makes the
sandbox from the request's spec or bubblewrap command line (bbld.bwrap.FrontEnd, here where
the caller's fds are), runs the engine's Instance, serves the instance's control socket in
INSTANCES_DIR (bbld.monitors.control), and reports `started` (layer pids and namespaces) and
`exited` (the main command's status) on the request's report channel. Monitors outlive bbld
and the forker. Synchronous; never trio.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import time

import msgspec

from bbld import bwrap, channel, peer, spec
from bbld.engine import Instance, StartError, prepare
from bbld.engine.errors import EXIT_USAGE
from bbld.engine.syscalls import default_signal_actions
from bbld.messages import INSTANCE_ID, Event, StartRequest
from bbld.monitors.console import Console
from bbld.monitors.control import Control

request_decoder = msgspec.json.Decoder(StartRequest)


def run(data: bytes, fds: list[int], directory: str) -> int:
    """One instance, in a forked child of the forker (a spare that took the request)."""
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
        request = request_decoder.decode(data)
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
        plan = prepare(sandbox(request, front), request.args)
        started = time.time()
        # The caller's environment goes to layer 1 as data; os.environ stays bbld's (making
        # it the caller's, one putenv per variable, is slow). A spec's layers also learn the
        # instance's id (helpers that name it, e.g. bbld.wayland); a bubblewrap command line's
        # environment stays exactly the caller's.
        env = request.env if front else {**request.env, "BBL_INSTANCE_ID": request.id}
        instance = Instance(plan, env, manager=True)
        instance.start()
    except bwrap.Done as done:  # --help, --version, or a bad command line: already said
        _send(report, Event(event="exited", status=done.status))
        return 0
    except spec.SpecError as exc:
        return _failed(report, front, "\n".join(exc.problems), 2)
    except StartError as exc:
        return _failed(report, front, str(exc), exc.exit_code, exc)
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
    console = None  # the app's terminal, held here (bbld.monitors.console)
    if instance.main_tty is not None:
        console, instance.main_tty = Console(instance, instance.main_tty), None
    control.console = console
    # The caller's client shows the terminal from the start, unless it starts detached.
    client = [console.attach()] if console and not request.hold_tty else []
    _send(report, Event(event="started", name=entry["name"], command=entry["command"],
                        started=started, main_pid=instance.main_pid, layers=layers,
                        tty=bool(client), die_with_parent=plan.sandbox.die_with_parent),
          [own, *client])
    for fd in (own, *client):
        os.close(fd)
    status = None
    try:
        try:
            status = instance.wait()
        except StartError as exc:
            return _failed(report, front, str(exc), exc.exit_code, exc)
        finally:
            if console is not None:  # (first: the client shows the app's last output)
                console.close()
            control.close(status, instance.cause)
        _send(report, Event(event="exited", status=status))
        return 0
    finally:
        instance.finish()  # (after the end is told: a NAT process takes tens of ms to go)


def sandbox(request: StartRequest, front: bwrap.FrontEnd | None) -> spec.Sandbox:
    """The request's spec, or its bubblewrap command line interpreted here, where the
    caller's fds, cwd and environment are (raises bwrap.Done once it has said why not).
    The caller's fds the command line does not name are closed."""
    callers = {0, 1, 2, *request.fd_numbers}  # (the monitor's own fds are not the caller's)
    if front is None:
        sandbox = spec.decode(request.spec, "json", "request")
    else:
        received = {number: _identity(number) for number in request.fd_numbers}
        sandbox = front.sandbox(request.bwrap, request.env, os.getuid(), os.getgid(),
                                request.name, callers, request.terminal)
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
            code: int, error: StartError | None = None) -> int:
    """Report a failed start (with the error's fields, for a front end that words it its
    own way); a bubblewrap command line's caller reads it on its stderr first, in
    bubblewrap's words and with its status (1)."""
    fields = {**error.fields(), "message": error.message} if error is not None else {}
    if front is not None:
        front.start_failed(message, fields)
        code = 1
    _send(report, Event(event="failed", message=message, exit_code=code,
                        reported=front is not None, fields=fields))
    return 0


def _send(report: socket.socket, event: Event, fds: list[int] = ()) -> None:
    try:
        channel.send(report, msgspec.json.encode(event), fds)
    except OSError:
        pass  # the daemon is gone; the instance goes on regardless
