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

    if not argv:
        sys.stderr.write(bwrap.usage(prog))
        return 1
    try:
        inv = bwrap.parse(argv, dict(os.environ))
        level_prefix = inv.level_prefix
        for warning in inv.warnings:
            say(warning, 4)
        sandbox = bwrap.to_sandbox(inv, os.getuid(), os.getgid())
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
                elif reply.get("event") == "exited":
                    return reply["status"]
        return 1
    finally:
        os.close(cwd)


def bwrap_main() -> int:
    """The `bbl-bwrap` entry point."""
    return main(sys.argv[1:], "bbl-bwrap")


if __name__ == "__main__":
    sys.exit(bwrap_main())
