"""`bblctl run [bubblewrap options] [--] COMMAND [ARGS...]` and `bbl-bwrap`: a bubblewrap
command line, run as an instance of the daemon.

The client stays light: it hands the command line to io.bbl.Manager.Run as it is, with its
stdin, stdout, stderr, working directory, environment and every other fd it has open. The
instance's monitor, which takes all of them over, interprets the command line the way
bubblewrap would in this process (bbld.bwrap.FrontEnd): warnings, errors, --help and
--version reach our stdout and stderr from there. The client forwards the signals it
receives to the instance and exits with the command's status. Messages and exit codes are
bubblewrap's: `bwrap: MESSAGE`, status 1.
"""

import os
import sys

from bblctl.cli import exit_now, is_name, printable
from bblctl.client import (
    ClientError,
    Connection,
    RemoteError,
    Sandboxed,
    SignalForwarder,
    connect,
    die_with_parent,
    running_daemon,
    sandboxed,
)

MAX_FDS = 56  # fds besides stdio that travel with the command line (bbld's limit)


def main(argv: list[str], prog: str = "bbl-bwrap") -> int:
    parent = os.getppid()  # (what --die-with-parent refers to, before it can die)
    instance = {}
    if prog == "bblctl run":  # BBL's own options, before bubblewrap's
        try:
            instance, argv = _instance_options(argv)
        except ValueError as exc:
            print(f"bblctl run: {exc}", file=sys.stderr)
            return 2
    if instance.get("single_instance") and sandboxed():
        print(f"{prog}: --single-instance needs bbld, which does not serve inside a sandbox;"
              " leave it out here", file=sys.stderr)
        return 2
    conn = None if instance.get("single_instance") else running_daemon()
    if conn is None:
        return _nested(argv, prog, parent) if sandboxed() \
            else _run_spec(argv, prog, instance, parent)
    fds = _open_fds(besides=conn.sock.fileno())
    if len(fds) > MAX_FDS:
        conn.close()
        _say(argv, f"{len(fds)} file descriptors are open besides stdin, stdout and stderr; "
                   f"at most {MAX_FDS} can go to a sandbox: close the others")
        return 1
    try:
        return _run(fds, dict(prog=prog, bwrap=argv, tty=_interactive(), **instance), parent,
                    conn)
    except Sandboxed:  # bbld refused us: the caller's fds are all still here
        return _nested(argv, prog, parent)
    except RemoteError as exc:
        if not exc.parameters.get("reported"):  # else the monitor printed it already
            _say(argv, exc.parameters.get("message", exc.name))
        return 1
    except ClientError as exc:
        _say(argv, str(exc))
        return 1


def _run(fds: list[int], parameters: dict, parent: int, conn: Connection | None = None
         ) -> int:
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with SignalForwarder() as forwarder, conn or connect() as conn:
            replies = conn.stream("io.bbl.Manager.Run", fds=(0, 1, 2, cwd, *fds), args=[],
                                  env=dict(os.environ), fd_numbers=fds, **parameters)
            for reply in replies:
                for number in fds:  # like bwrap, which closes them: readers see EOF in time
                    os.close(number)  # (not before bbld answered: if it refuses us, we nest)
                fds = []
                if reply.get("event") == "started":
                    if reply.get("die_with_parent"):
                        die_with_parent(parent)
                    forwarder.aim(id=reply["id"])
                    if reply.get("tty") and conn.fds:  # an interactive command's pty
                        from bblctl.terminal import attach_terminal

                        attach_terminal(conn.fds.pop(0), conn.sock, console=True)
                elif reply.get("event") == "forwarded":  # to a running single instance
                    forwarder.aim(id=reply["id"], pid=reply["pid"])
                elif reply.get("event") == "exited":
                    return reply["status"]
        return 1
    finally:
        os.close(cwd)


def _interactive() -> bool:
    """Whether we run in the foreground of a terminal that is our stdin, stdout and stderr:
    then we can relay a pty made in the sandbox (a background job may not touch the
    terminal's modes, and a redirected stream must not get a pty's line endings)."""
    try:
        return all(os.isatty(fd) for fd in (0, 1, 2)) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _open_fds(besides: int) -> list[int]:
    """Our open fds above stderr but `besides` (the connection): what the command line may
    name (bwrap would see them)."""
    return sorted(fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2
                  and fd != besides and _is_open(fd))


def _is_open(fd: int) -> bool:
    try:  # (listdir's own directory fd is in its listing, closed by now)
        os.fstat(fd)
        return True
    except OSError:
        return False


def _say(argv: list[str], message: str) -> None:
    prefix = "<3>" if "--level-prefix" in argv else ""
    print(f"{prefix}bwrap: {printable(message)}", file=sys.stderr)


def _run_spec(argv: list[str], prog: str, instance: dict, parent: int) -> int:
    """The command line made into a spec here (the slower path: it imports bbld.bwrap).
    For --single-instance, since bbld looks for a running instance with the spec's name
    before it starts anything; and when no bbld runs yet, so that a bad command line
    starts no daemon (which then takes longer to start than this path to import)."""
    import msgspec

    from bbld import bwrap, spec

    front = bwrap.FrontEnd(prog)
    try:
        sandbox = front.sandbox(argv, dict(os.environ), os.getuid(), os.getgid(),
                                instance.get("name"), terminal=_interactive())
    except bwrap.Done as done:
        return done.status
    sandbox.single_instance = bool(instance.get("single_instance"))
    numbers = sorted(spec.caller_fds(sandbox))
    for number in numbers:
        if not _is_open(number):
            front.say(f"fd {number} is not open")
            return 1
    if sandbox.die_with_parent:
        die_with_parent(parent)
    try:
        return _run(numbers, dict(spec=msgspec.json.encode(sandbox).decode(),
                                  die_with_client=sandbox.die_with_parent), parent)
    except Sandboxed:  # (a sandbox our own look did not tell: bbld did)
        return _nested(argv, prog, parent, sandbox, front)
    except RemoteError as exc:
        front.start_failed(exc.parameters.get("message", exc.name),
                           exc.parameters.get("fields"))
        return 1
    except ClientError as exc:
        front.say(str(exc))
        return 1


def _nested(argv: list[str], prog: str, parent: int, sandbox=None, front=None) -> int:
    """Inside a sandbox, bubblewrap's semantics: the engine runs here, in our namespaces, so
    the new sandbox can only narrow what this one allows (bbld.engine.standalone)."""
    from bbld import bwrap
    from bbld.engine.standalone import run_bwrap

    front = front or bwrap.FrontEnd(prog)
    if sandbox is None:
        try:
            sandbox = front.sandbox(argv, dict(os.environ), os.getuid(), os.getgid())
        except bwrap.Done as done:
            return done.status
    if sandbox.die_with_parent:  # (layer 1 dies with us: the engine runs in this process)
        die_with_parent(parent)
    return run_bwrap(argv, prog, sandbox, front)


def _instance_options(argv: list[str]) -> tuple[dict, list[str]]:
    """`--name NAME` and `--single-instance`, which only `bblctl run` takes (before any
    bubblewrap option)."""
    found = {}
    while argv and argv[0] in ("--name", "--single-instance"):
        if argv[0] == "--single-instance":
            found["single_instance"], argv = True, argv[1:]
        elif len(argv) < 2 or not is_name(argv[1]):
            raise ValueError("--name needs a name of letters, digits, '.', '_' and '-' "
                             "(at most 64, starting with a letter or digit)")
        else:
            found["name"], argv = argv[1], argv[2:]
    if found.get("single_instance") and "name" not in found:
        raise ValueError("--single-instance needs --name NAME (what a second start looks for)")
    return found, argv


def bwrap_main() -> None:
    """The `bbl-bwrap` entry point. Its usage names the program as it was called, as
    bubblewrap's does: scripts call it as `bwrap` through a symlink. (A script's argv[0] is
    the path the shell found, so this is its last part.)"""
    exit_now(lambda: main(sys.argv[1:], os.path.basename(sys.argv[0])))


if __name__ == "__main__":
    exit_now(lambda: main(sys.argv[1:], "bbl-bwrap"))
