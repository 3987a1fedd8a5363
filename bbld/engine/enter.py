"""Entering a running layer: `bblctl exec` and `bblctl attach`.

The new process gets exactly what the layer's own commands get: its namespaces, uid/gid,
capabilities, no_new_privs, seccomp filter, environment and working directory. It goes
through the same last steps as they do (commands.restrict_and_exec).

Supervisors are not dumpable, so nobody can open their /proc/PID/ns files, their owner
included; instead each supervisor opened its own namespace files while it built its layer and
handed them to the engine's caller with its Built report. Here a forked child of the caller
enters them (the user namespace first, which gives it the right to enter the others), then
clones the command with CLONE_PARENT: the command is born in the layer's pid namespace as the
caller's own child, and the caller follows it by pidfd. For a terminal the command opens a
pty from the layer's own /dev/ptmx, so the pty belongs to the sandbox, not to the host.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket

from msgspec import Struct

from bbld import channel as bbld_channel
from bbld import spec
from bbld.engine import namespaces, privileges, reports, terminal
from bbld.engine import syscalls as sc
from bbld.engine.commands import change_directory, restrict_and_exec, start_fresh
from bbld.engine.errors import StartError
from bbld.engine.plan import LayerPlan, Plan

ORDER = namespaces.ENTER_ORDER  # (the user namespace first: it owns the others)


class Entered(Struct):
    pidfd: int  # the command, a child of the caller (CLONE_PARENT)
    master: int | None = None  # the pty master, when a terminal was asked for
    # A pidfd of the forked process that joined the layer: it ends right after the command
    # is cloned; the caller reaps it when the pidfd says so (its exit, releasing a forked
    # interpreter's memory, takes milliseconds nobody should wait for).
    joiner: int = -1
    joiner_pid: int = 0
    pid: int = 0  # the command's, in the caller's pid namespace (Instance.enter)


def enter(plan: Plan, layer: LayerPlan, namespace_fds: dict[str, int], argv: list[str],
          env: dict[str, str], cwd: tuple[str | None, str | None],
          stdio: tuple[int, int, int] | None,
          cgroup_fd: int | None = None) -> Entered:
    """Start `argv` in `layer` (and in `cgroup_fd`, the cgroup its processes count in);
    stdio None means a new pty; `cwd`: the layer's working directory if it has one, and the
    caller's (supervisor.change_directory). Raises StartError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    own = {name: _identity(f"/proc/self/ns/{name}") for name, _ in ORDER}  # before any setns
    entering = os.fork()
    if entering == 0:
        ours.close()
        try:
            _enter(plan, layer, namespace_fds, own, argv, env, cwd, stdio, theirs, cgroup_fd)
        except BaseException as exc:
            _say_failure(theirs, exc)
        os._exit(0)
    theirs.close()
    joiner = os.pidfd_open(entering)
    try:
        entered = _receive(ours)
    except BaseException:
        os.waitpid(entering, 0)
        os.close(joiner)
        raise
    finally:
        ours.close()
    entered.joiner, entered.joiner_pid = joiner, entering
    return entered


def _enter(plan, layer, namespace_fds, own, argv, env, cwd, stdio, channel, cgroup_fd) -> None:
    """In the forked child: join the layer, then clone the command as the caller's child."""
    _join(namespace_fds, own)
    command_side, ours = socket.socketpair(socket.AF_UNIX,
                                           socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    # (clone3 wants exit_signal 0 with CLONE_PARENT; the kernel then gives the command our
    # own exit signal, SIGCHLD: its end is signalled to the caller like any child's)
    pid, pidfd = sc.clone(sc.CLONE_PARENT, exit_signal=0, cgroup_fd=cgroup_fd)
    if pid == 0:
        ours.close()
        channel.close()
        try:
            _command(plan, layer, argv, env, cwd, stdio, command_side)
        except BaseException as exc:
            _say_failure(command_side, exc)
        os._exit(127)
    command_side.close()
    bbld_channel.send(channel, reports.step(reports.Joined()), [pidfd, ours.fileno()])


def join_namespaces(namespace_fds: dict[str, int]) -> None:
    """Enter the namespaces of `namespace_fds` (/proc/PID/ns names -> fds) from ours."""
    _join(namespace_fds, {name: _identity(f"/proc/self/ns/{name}") for name, _ in ORDER})


def _join(namespace_fds: dict[str, int], own: dict) -> None:
    """Enter the layer's namespaces. Entering one takes CAP_SYS_ADMIN in the user namespace
    that owns it *and* in our current one, and capabilities never reach up to an ancestor;
    so walk down the chain of user namespaces from ours to the layer's, entering each
    namespace right after the user namespace that owns it."""
    chain = _user_chain(namespace_fds.get("user"), own["user"])
    owned: dict[tuple, list[tuple[str, int, int]]] = {}
    for name, flag in ORDER[1:]:
        fd = namespace_fds.get(name)
        if fd is None or own.get(name) == _identity(fd):
            continue  # the caller's own: setns() would refuse to enter it again
        owner = _owner(fd)
        owned.setdefault(owner, []).append((name, fd, flag))
    steps = [(None, owned.pop(own["user"], []))]
    steps += [(user_fd, owned.pop(_identity(user_fd), [])) for user_fd in chain]
    if owned:
        raise StartError("the layer's namespaces are owned outside its user namespaces")
    for user_fd, members in steps:
        if user_fd is not None:
            _setns("user", user_fd, sc.CLONE_NEWUSER)
        for name, fd, flag in members:
            _setns(name, fd, flag)


def _setns(name: str, fd: int, flag: int) -> None:
    try:
        sc.setns(fd, flag)
    except OSError as exc:
        raise StartError(f"entering the layer's {name} namespace: {exc.strerror}") from None


def _identity(target: int | str) -> tuple[int, int] | None:
    """(device, inode) of an fd or a path: what tells two namespaces apart."""
    try:
        info = os.stat(target)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _owner(fd: int) -> tuple[int, int]:
    owner = fcntl.ioctl(fd, sc.NS_GET_USERNS)
    try:
        return _identity(owner)
    finally:
        os.close(owner)


def _user_chain(layer_user: int | None, ours: tuple) -> list[int]:
    """The user namespaces from just below ours down to the layer's, as fds (top first)."""
    if layer_user is None or _identity(layer_user) == ours:
        return []
    chain = [os.dup(layer_user)]
    while True:
        parent = fcntl.ioctl(chain[0], sc.NS_GET_PARENT)
        if _identity(parent) == ours:
            os.close(parent)
            return chain
        chain.insert(0, parent)


def _command(plan: Plan, layer: LayerPlan, argv, env, cwd, stdio, channel) -> None:
    """In the command process, inside the layer: terminal, identity, then the last steps."""
    start_fresh(new_session=True)  # (never the caller's terminal session)
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if stdio is None:
        _open_terminal(channel)
    else:
        for target, source in enumerate(stdio):
            os.dup2(source, target)
    if "user" in layer.layer.namespaces or layer.layer.join and layer.layer.join.user is not None:
        privileges.become(layer.layer)
    path = change_directory(*cwd, env.get("HOME"))
    try:
        restrict_and_exec(plan, layer, spec.Command(argv=argv), {**env, "PWD": path},
                          channel.fileno())
    except StartError as exc:
        raise exc.located(repr(argv[0]), command=argv[0]) from None


def _open_terminal(channel: socket.socket) -> None:
    """A pty from the layer's own devpts: its slave becomes our controlling terminal and
    stdio; the master goes back to the caller."""
    master, slave = terminal.open_pty()
    terminal.take(slave)
    bbld_channel.send(channel, reports.step(reports.Terminal()), [master])
    os.close(master)


def _say_failure(channel: socket.socket, exc: BaseException) -> None:
    try:
        channel.send(reports.failure(exc))
    except OSError:
        pass


def _receive(channel: socket.socket) -> Entered:
    """What the entering child, then the command, say: its pidfd, maybe a pty, or an error."""
    said, fds = _next_step(channel, 2)
    if not isinstance(said, reports.Joined) or len(fds) != 2:
        _close(fds)
        raise StartError("the layer could not be entered")
    entered = Entered(pidfd=fds[0])
    with socket.socket(fileno=fds[1]) as command:
        try:
            while True:  # until exec closes the command's end (close-on-exec)
                said, fds = _next_step(command, 1)
                if said is None:
                    return entered
                if isinstance(said, reports.Terminal) and len(fds) == 1 \
                        and entered.master is None:
                    entered.master = fds[0]
                else:
                    _close(fds)
        except BaseException:
            os.waitid(os.P_PIDFD, entered.pidfd, os.WEXITED | sc.WALL)  # it exits: reap it
            _close([entered.pidfd, entered.master] if entered.master is not None
                   else [entered.pidfd])
            raise


def _next_step(sock: socket.socket, max_fds: int):
    """(what was said, its fds); (None, []) at the end; a failure raises StartError."""
    try:
        data, fds = bbld_channel.receive(sock, reports.MAX_REPORT, max_fds)
    except bbld_channel.Truncated as exc:
        raise StartError(str(exc)) from None
    if not data:
        _close(fds)
        return None, []
    said = reports.read_step(data)
    if isinstance(said, reports.CommandFailed):
        _close(fds)
        raise reports.failed_command(said)
    return said, fds


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)
