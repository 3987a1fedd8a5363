"""A command's last steps, from the fork to execve: the same for a layer's commands, its
companions, and what exec and attach start in a running layer (bbld.engine.enter). In this
order: a fresh signal state and session, identity, the working directory, then umask,
rlimits, capabilities, no_new_privs, fds and seccomp (restrict_and_exec)."""

from __future__ import annotations

import os
import resource
import signal

from msgspec import Struct

from bbld import spec
from bbld.engine import privileges
from bbld.engine import syscalls as sc
from bbld.engine.errors import EXIT_USAGE, StartError
from bbld.engine.plan import LayerPlan, Plan


class Prepared(Struct):
    """A command forked and readied before the go byte: it waits for a byte on `release`."""
    command: spec.Command
    companion: bool
    pid: int
    release: int  # write end: one byte lets it exec
    errors: int  # read end: its failure, or EOF once it has executed


def start_fresh(new_session: bool) -> None:
    """The first of a command's last steps (a layer's, or one exec enters a layer with): no
    signal blocked, the default actions for those Python ignores (exec would keep that), and
    with `new_session` a session of its own: no controlling terminal, so TIOCSTI cannot
    reach the caller's."""
    sc.set_signal_mask(signal.SIG_SETMASK, [])
    sc.default_signal_actions(signal.SIGPIPE, signal.SIGXFSZ)
    if new_session:
        os.setsid()


def change_directory(explicit: str | None, inherited: str | None, home: str | None) -> str:
    """A command's working directory: `explicit` (the command's or its layer's cwd), which
    must work (exit 2); without one the first that works of the inherited cwd, $HOME and /,
    and is reachable from this root (not "(unreachable)": a cwd left outside a new root)."""
    for path in [explicit] if explicit else [inherited, home, "/"]:
        if not path:
            continue
        try:
            os.chdir(path)
        except OSError as exc:
            if explicit:
                raise StartError(f"working directory {path}: {exc.strerror}", EXIT_USAGE,
                                 what="chdir", path=path, strerror=exc.strerror) from None
            continue
        if os.getcwd().startswith("/"):
            return path
    raise StartError("no usable working directory")


def restrict_and_exec(plan: Plan, layer: LayerPlan, command: spec.Command,
                      env: dict[str, str], errors_fd: int, release_fd: int | None = None
                      ) -> None:
    """The last steps of every process a layer runs (its commands, and what exec and attach
    start in it later), in this order: umask, rlimits, capabilities, no_new_privs, fds,
    seccomp."""
    os.umask(plan.umask)
    for name, value in layer.layer.rlimits.items():  # lowering needs no capability
        resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (value, value))
    privileges.restrict_capabilities(layer.caps, plan.cap_last, layer.layer.ambient_caps)
    privileges.no_new_privs()
    sc.close_all_fds_except({0, 1, 2, errors_fd, *command.pass_fds,
                             *([release_fd] if release_fd is not None else [])})
    for fd in command.pass_fds:
        os.set_inheritable(fd, True)
    if release_fd is not None and os.read(release_fd, 1) != b"1":
        os._exit(1)  # the start was called off (our supervisor is gone)
    privileges.load_seccomp(layer.seccomp)  # last: the filter may forbid the steps above
    argv = [command.argv0 or command.argv[0], *command.argv[1:]]
    try:
        os.execvpe(command.argv[0], argv, env)
    except OSError as exc:
        code = EXIT_USAGE if isinstance(exc, (FileNotFoundError, PermissionError)) else 1
        raise StartError(f"cannot execute: {exc.strerror}", code, what="exec",
                         strerror=exc.strerror) from None
