"""`bblctl run [bubblewrap options] [--] COMMAND [ARGS...]` and `bbl-bwrap`: a bubblewrap
command line, run as an instance of the daemon.

The client parses the command line (bbld.bwrap), turns it into a spec, and calls
io.bbl.Manager.Run with its own stdin, stdout, stderr, working directory and the fds the
options name. It forwards the signals it receives to the instance and exits with the command's
status. Messages and exit codes are bubblewrap's: `bwrap: MESSAGE`, status 1.
"""

from __future__ import annotations

import os
import sys

import msgspec

from bblctl.client import ClientError, RemoteError, SignalForwarder, connect
from bbld import bwrap, spec


def main(argv: list[str], prog: str = "bbl-bwrap") -> int:
    level_prefix = False  # set by the parse: --level-prefix affects the messages after it

    def say(message: str, level: int = 3) -> None:
        prefix = f"<{level}>" if level_prefix else ""
        print(f"{prefix}bwrap: {message}", file=sys.stderr)

    instance = {}
    if prog == "bblctl run":  # BBL's own options, before bubblewrap's
        try:
            instance, argv = _instance_options(argv)
        except ValueError as exc:
            print(f"bblctl run: {exc}", file=sys.stderr)
            return 2
    if not argv:
        sys.stderr.write(bwrap.usage(prog))
        return 1
    try:
        inv = bwrap.parse(argv, dict(os.environ))
        level_prefix = inv.level_prefix
        for warning in inv.warnings:
            say(warning, 4)
        sandbox = bwrap.to_sandbox(inv, os.getuid(), os.getgid())
        for key, value in instance.items():
            setattr(sandbox, key, value)
    except bwrap.Help:
        sys.stdout.write(bwrap.usage(prog))
        return 0
    except bwrap.Version:
        print(bwrap.VERSION)
        return 0
    except bwrap.ParseError as exc:
        level_prefix = exc.level_prefix
        if str(exc) == "usage":
            sys.stderr.write(bwrap.usage(prog))
        else:
            say(str(exc))
        return 1
    try:
        return _run(sandbox, say)
    except RemoteError as exc:
        say(bwrap.bwrap_message(exc.parameters.get("message", exc.name)))
        return 1
    except ClientError as exc:
        say(str(exc))
        return 1


def _run(sandbox: spec.Sandbox, say) -> int:
    numbers = sorted(spec.caller_fds(sandbox))
    for number in numbers:
        try:
            os.fstat(number)
        except OSError:
            say(f"fd {number} is not open")
            return 1
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with SignalForwarder() as forwarder, connect() as conn:
            replies = conn.stream("io.bbl.Manager.Run", fds=(0, 1, 2, cwd, *numbers),
                                  spec=msgspec.json.encode(sandbox).decode(), args=[], env={},
                                  fd_numbers=numbers,
                                  die_with_client=sandbox.die_with_parent)
            for number in numbers:  # like bwrap, which closes them: readers see EOF in time
                if number > 2:
                    os.close(number)
            for reply in replies:
                if reply.get("event") == "started":
                    forwarder.aim(id=reply["id"])
                elif reply.get("event") == "forwarded":  # to a running single instance
                    forwarder.aim(id=reply["id"], pid=reply["pid"])
                elif reply.get("event") == "exited":
                    return reply["status"]
        return 1
    finally:
        os.close(cwd)


def _instance_options(argv: list[str]) -> tuple[dict, list[str]]:
    """`--name NAME` and `--single-instance`, which only `bblctl run` takes (before any
    bubblewrap option)."""
    found = {}
    while argv and argv[0] in ("--name", "--single-instance"):
        if argv[0] == "--single-instance":
            found["single_instance"], argv = True, argv[1:]
        elif len(argv) < 2 or not spec.NAME_PATTERN.match(argv[1]):
            raise ValueError(f"--name needs a name matching {spec.NAME_PATTERN.pattern}")
        else:
            found["name"], argv = argv[1], argv[2:]
    if found.get("single_instance") and "name" not in found:
        raise ValueError("--single-instance needs --name NAME (what a second start looks for)")
    return found, argv


def bwrap_main() -> int:
    """The `bbl-bwrap` entry point."""
    return main(sys.argv[1:], "bbl-bwrap")


if __name__ == "__main__":
    sys.exit(bwrap_main())
