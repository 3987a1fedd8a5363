"""What every bblctl command shares: its command-line parsing and its one-line errors. Kept
light: every command imports it at start-up."""

import os
import sys

from bblctl.client import ClientError, RemoteError

NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def is_name(text: str) -> bool:
    """bbld.spec.NAME_PATTERN, without importing the spec (a test keeps the two equal)."""
    return 0 < len(text) <= 64 and text[0].isascii() and text[0].isalnum() \
        and set(text) <= NAME_CHARACTERS


def printable(text: str) -> str:
    """bbld.text.printable (escapes for a terminal), imported only for text that needs it:
    most never does, and every module costs a command a fifth of a millisecond to load."""
    if text.isprintable():
        return text
    from bbld.text import printable as escaped

    return escaped(text)


class UsageError(Exception):
    """A bad command line: the message says what and how to fix it (exit status 2)."""


def parse(argv: list[str], flags: dict[str, bool], values: dict[str, str]):
    """Options (`--name` flags, `--name VALUE` values) and positional arguments, in any order;
    everything after `--` is positional."""
    positional = []
    flags, values = dict(flags), dict(values)
    while argv:
        arg, argv = argv[0], argv[1:]
        if arg == "--":
            positional += argv
            break
        name, eq, inline = arg.partition("=")
        if name in flags and not eq:
            flags[name] = True
        elif name in values:
            if not eq and not argv:
                raise UsageError(f"{name} needs a value")
            values[name], argv = (inline, argv) if eq else (argv[0], argv[1:])
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {arg}")
        else:
            positional.append(arg)
    return flags, values, positional


READER_GONE = 141  # 128 + SIGPIPE: what `ls | head` shows for ls


def exit_now(main) -> None:
    """Exit with the status `main()` returns, skipping the interpreter's finalization:
    tearing down every module object takes longer than a whole bubblewrap run, and
    a client leaves nothing that needs it (no threads, no atexit handlers; files close with
    the process). The installed scripts end here. If our output's reader went away
    (`bblctl ps | head -1`), we end quietly, as a program killed by SIGPIPE would."""
    try:
        status = main()
    except BrokenPipeError:
        status = READER_GONE
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        status = status or READER_GONE
    os._exit(status)


def report(error: ClientError) -> int:
    """Print a client error as one line; the exit status for it."""
    if isinstance(error, RemoteError) and error.name == "io.bbl.Manager.NoSuchInstance":
        print(f"bblctl: no running instance {printable(repr(error.parameters.get('id')))}; "
              "see bblctl ps", file=sys.stderr)
        return 2
    if isinstance(error, RemoteError) and error.name == "io.bbl.Manager.AmbiguousInstance":
        candidates = error.parameters.get("candidates") or []
        print(f"bblctl: {printable(repr(error.parameters.get('id')))} fits "
              f"{len(candidates)} running instances ({printable(', '.join(candidates))}): "
              "give an id, or more of it", file=sys.stderr)
        return 2
    if isinstance(error, RemoteError) and "message" in error.parameters:
        print(f"bblctl: {printable(str(error.parameters['message']))}", file=sys.stderr)
        return error.parameters.get("exit_code", 1)
    print(f"bblctl: {printable(str(error))}", file=sys.stderr)
    return 1
