"""`python -m bbld.engine SPEC [-- ARGS...]`: run a spec in the foreground, no daemon.

Exit status: the main command's (128+N if killed by signal N); 1 when the start failed at run
time; 2 when the spec is invalid or does not fit this machine. Errors are one line each.
"""

import os
import sys

from bbld import spec
from bbld.engine import StartError, load, prepare, run

USAGE = """usage: python -m bbld.engine [--check] [--info-fd FD] SPEC [-- ARGS...]

Run the sandbox described by SPEC (a .toml or .json file, or - for JSON on stdin) in the
foreground. ARGS are appended to the main command.
  --check       only validate SPEC (and read its fds); start nothing
  --info-fd FD  once running, write one JSON line per layer to FD: its name, the host pid of
                its supervisor and its namespace inode numbers; then close FD"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    check_only, info_fd = False, None
    while argv and argv[0] in ("--check", "--info-fd"):
        if argv[0] == "--check":
            check_only, argv = True, argv[1:]
            continue
        if len(argv) < 2 or not argv[1].isdigit():
            print("bbl: --info-fd needs a file descriptor number", file=sys.stderr)
            return 2
        info_fd, argv = int(argv[1]), argv[2:]
        try:
            os.fstat(info_fd)
        except OSError:
            print(f"bbl: --info-fd {info_fd}: not an open file descriptor", file=sys.stderr)
            return 2
    if not argv:
        print("bbl: missing SPEC; see --help", file=sys.stderr)
        return 2
    path, rest = argv[0], argv[1:]
    if rest and rest[0] != "--":
        print(f"bbl: unexpected argument {rest[0]!r}; put the command's arguments after --",
              file=sys.stderr)
        return 2
    try:
        sandbox = load(path)
        if check_only:
            prepare(sandbox)
            return 0
        return run(sandbox, rest[1:], info_fd)
    except spec.SpecError as exc:
        for problem in exc.problems:  # each names the file, once
            where = "" if problem.startswith(("<stdin>:", f"{path}:")) else f"{path}: "
            print(f"bbl: {where}{problem}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"bbl: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
