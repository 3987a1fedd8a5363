"""`bblctl exec` and `bblctl attach`: a command in a layer of a running instance.

exec passes stdin, stdout and stderr through; attach gets a pty made inside the sandbox (the
daemon passes its master here) and relays it to the local terminal (bblctl.terminal, imported
only then: exec and send-args need none of it).
"""

from bblctl.cli import UsageError
from bblctl.client import SignalForwarder, connect


def parse(argv: list[str], command: str) -> tuple[str, str | None, list[str]]:
    """`[--layer NAME] ID [--] [CMD...]`: options first, then the id, then the command."""
    layer = None
    while argv and argv[0].startswith("--") and argv[0] != "--":
        name, eq, value = argv[0].partition("=")
        if name != "--layer":
            raise UsageError(f"unknown option {argv[0]}")
        if not eq:
            if len(argv) < 2:
                raise UsageError("--layer needs a layer name; see bblctl tree")
            value, argv = argv[1], argv[1:]
        layer, argv = value, argv[1:]
    if not argv or argv[0] == "--":
        raise UsageError(f"{command} needs an instance id or name; see bblctl ps")
    instance, rest = argv[0], argv[1:]
    if rest and rest[0] == "--layer":  # also after the id
        return parse(["--layer", *rest[1:2], instance, *rest[2:]], command)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return instance, layer, rest


def exec_(argv: list[str]) -> int:
    instance, layer, command = parse(argv, "exec")
    if not command:
        raise UsageError("exec needs a command after the instance: bblctl exec ID -- CMD...")
    return _run_in(instance, "io.bbl.Manager.Exec", argv=command,
                   **({"layer": layer} if layer else {}))


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
    from bblctl.terminal import attach_terminal

    instance, layer, command = parse(argv, "attach")  # no command: bbld starts a shell
    with connect() as conn:
        replies = conn.stream("io.bbl.Manager.Exec", id=instance, argv=command,
                              tty=True, **({"layer": layer} if layer else {}))
        next(replies)  # started: the pty's master came with it
        if not conn.fds:
            raise UsageError("the daemon sent no terminal")
        attach_terminal(conn.fds.pop(0), conn.sock)
        for reply in replies:
            if reply["event"] == "exited":
                return reply["status"]
    return 1
