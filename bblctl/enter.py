"""`bblctl exec` and `bblctl attach`: a command in a layer of a running instance.

exec passes stdin, stdout and stderr through; attach shows the app's own terminal (its
monitor holds it: Attach) or a new pty made inside the sandbox (Exec with tty: the daemon
passes its master here), relayed to the local terminal (bblctl.terminal, imported only then:
exec and send-args need none of it).
"""

import sys

from bblctl.cli import UsageError, printable
from bblctl.client import RemoteError, SignalForwarder, connect


def parse(argv: list[str], command: str, flags: tuple[str, ...] = (),
          values: tuple[str, ...] = ("--layer",)) -> tuple[str, dict, list[str]]:
    """`[OPTIONS] ID [OPTIONS] [--] [CMD...]`: the options (`flags`, and `values` that take
    one) before or right after the id, then the command."""
    options: dict = {}
    instance = None
    while argv and argv[0] != "--":
        name, eq, value = argv[0].partition("=")
        if instance is not None and name not in (*flags, *values):
            break  # (the command)
        if not name.startswith("--"):
            instance, argv = argv[0], argv[1:]
            continue
        if name in flags and not eq:
            options[name], argv = True, argv[1:]
            continue
        if name not in values:
            raise UsageError(f"unknown option {argv[0]}")
        if not eq:
            value, argv = (argv[1], argv[1:]) if len(argv) > 1 else ("", argv)
        if not value:
            raise UsageError(f"{name} needs a value" if name != "--layer"
                             else "--layer needs a layer name; see bblctl tree")
        options[name], argv = value, argv[1:]
    if instance is None:
        raise UsageError(f"{command} needs an instance id or name; see bblctl ps")
    if argv and argv[0] == "--":
        argv = argv[1:]
    return instance, options, argv


def exec_(argv: list[str]) -> int:
    instance, options, command = parse(argv, "exec")
    if not command:
        raise UsageError("exec needs a command after the instance: bblctl exec ID -- CMD...")
    return _run_in(instance, "io.bbl.Manager.Exec", argv=command,
                   **({"layer": options["--layer"]} if "--layer" in options else {}))


def send_args(argv: list[str]) -> int:
    """`ID|NAME [--] ARGS...`: hand ARGS to the running instance (its spec says how)."""
    if not argv or argv[0] == "--":
        raise UsageError("send-args needs an instance id or name; see bblctl ps")
    instance, args = argv[0], argv[1:]
    if args and args[0] == "--":
        args = args[1:]
    return _run_in(instance, "io.bbl.Manager.SendArgs", args=args)


def _run_in(instance: str, method: str, **parameters) -> int:
    """Exec or SendArgs with our stdio; signals we get go to the command; its status."""
    with SignalForwarder() as forwarder, connect() as conn:
        for reply in conn.stream(method, fds=(0, 1, 2), id=instance, **parameters):
            if reply["event"] == "started":
                forwarder.aim(id=instance, pid=reply["pid"])
            elif reply["event"] == "exited":
                return reply["status"]
    return 1


def attach(argv: list[str]) -> int:
    """The app's own terminal (detach key: Ctrl-] unless --detach-key), when it has one and
    neither a layer, a command nor --new is given; else a new terminal with a command (a
    shell by default) in the layer."""
    from bblctl import terminal

    instance, options, command = parse(argv, "attach", ("--new",),
                                       ("--layer", "--detach-key"))
    try:
        key = terminal.detach_key(options.get("--detach-key"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not ({"--new", "--layer"} & options.keys() or command):
        try:
            return _attach_console(instance, key)
        except RemoteError as exc:
            if exc.name != "io.bbl.Manager.NoTerminal":
                raise
            print(f"bblctl: notice: {printable(exc.parameters.get('message', ''))}: a new "
                  "terminal in its layer instead (see bblctl attach --help)", file=sys.stderr)
    with connect() as conn:
        replies = conn.stream("io.bbl.Manager.Exec", id=instance, argv=command, tty=True,
                              **({"layer": options["--layer"]} if "--layer" in options else {}))
        next(replies)  # started: the pty's master came with it
        if not conn.fds:
            raise UsageError("the daemon sent no terminal")
        terminal.attach_terminal(conn.fds.pop(0), conn.sock)
        for reply in replies:
            if reply["event"] == "exited":
                return reply["status"]
    return 1


def _attach_console(instance: str, key: bytes | None) -> int:
    """Attach to the app's terminal: its status if it ends meanwhile, else 0 (detached)."""
    from bblctl.terminal import ENDED, attach_terminal, said_detached

    with connect() as conn:
        replies = conn.stream("io.bbl.Manager.Attach", id=instance)
        started = next(replies)
        if not conn.fds:
            raise UsageError("the daemon sent no terminal")
        how = attach_terminal(conn.fds.pop(0), conn.sock, console=True, key=key)
        if how != ENDED:
            return said_detached(how, started["id"])
        for reply in replies:
            if reply["event"] == "exited":
                return reply["status"]
    return 1
