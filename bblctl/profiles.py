"""`bblctl start PROFILE` and `bblctl profile list|show|validate`."""

from __future__ import annotations

import os
import sys

import msgspec

from bblctl.cli import UsageError, parse
from bblctl.client import SignalForwarder, connect
from bblctl.enter import Terminal, relay
from bbld import profile, spec


def start(argv: list[str]) -> int:
    """`PROFILE [--name N] [--detach] [-- ARGS...]`: foreground by default, with a pty made
    inside the sandbox when stdin is a terminal; --detach prints the instance id."""
    flags, values, positional = parse(argv, {"--detach": False}, {"--name": None})
    if not positional:
        raise UsageError("start needs a profile name or file; see bblctl profile list")
    name, args = positional[0], positional[1:]
    sandbox = _load(name)
    if values["--name"] is not None:
        if not spec.NAME_PATTERN.match(values["--name"]):
            raise UsageError(f"--name {values['--name']!r}: use letters, digits, . _ -")
        sandbox.name = values["--name"]
    tty = flags["--detach"] or os.isatty(0)  # detached: the monitor holds the terminal
    main = spec.path_to(sandbox.layer, spec.main_layer_name(sandbox))[-1]
    main.command = msgspec.structs.replace(main.command, tty=tty)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stdio = (null, null, null) if flags["--detach"] else (0, 1, 2)
    try:
        with SignalForwarder() as forwarder, connect() as conn:
            replies = conn.stream("io.bbl.Manager.Run", fds=(*stdio, cwd),
                                  spec=msgspec.json.encode(sandbox).decode(), args=args,
                                  env=dict(os.environ), detach=flags["--detach"])
            for reply in replies:
                if reply["event"] in ("started", "forwarded") and flags["--detach"]:
                    print(reply["id"])
                    return 0
                if reply["event"] == "forwarded":  # to the running single instance
                    forwarder.aim(id=reply["id"], pid=reply["pid"])
                elif reply["event"] == "started":
                    forwarder.aim(id=reply["id"])
                    if reply.get("tty") and conn.fds:
                        _terminal(conn.fds.pop(0), conn.sock)
                elif reply["event"] == "exited":
                    return reply["status"]
    finally:
        os.close(null)
        os.close(cwd)
    return 1


def _terminal(master: int, daemon) -> None:
    try:
        with Terminal(master):
            relay(master, daemon)
    finally:
        os.close(master)


def _load(name: str) -> spec.Sandbox:
    try:
        return profile.load(profile.find(name))
    except profile.ProfileError as exc:
        raise UsageError("\n".join(exc.problems)) from None


def profile_command(argv: list[str]) -> int:
    if not argv or argv[0] not in ("list", "show", "validate"):
        raise UsageError("use `bblctl profile list`, `show NAME [--expanded]` or "
                         "`validate FILE|NAME`")
    command, argv = argv[0], argv[1:]
    flags, _, positional = parse(argv, {"--expanded": False}, {})
    if command == "list":
        for name, path in profile.available().items():
            print(f"{name:20} {path}")
        return 0
    if len(positional) != 1:
        raise UsageError(f"profile {command} takes one profile name or file")
    if command == "validate":
        try:
            profile.load(profile.find(positional[0]))
        except profile.ProfileError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return 2
        print(f"{positional[0]}: valid")
        return 0
    path = _find(positional[0])
    if flags["--expanded"]:  # the spec, as `python -m bbld.engine` takes it (JSON)
        print(msgspec.json.format(msgspec.json.encode(_load(path)).decode(), indent=2))
    else:
        with open(path) as f:
            sys.stdout.write(f.read())
    return 0


def _find(name: str) -> str:
    try:
        return profile.find(name)
    except profile.ProfileError as exc:
        raise UsageError("\n".join(exc.problems)) from None
