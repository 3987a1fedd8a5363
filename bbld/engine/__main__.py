"""`python -m bbld.engine SPEC [-- ARGS...]`: run a spec in the foreground, no daemon.

Exit status: the main command's (128+N if killed by signal N); 1 when the start failed at run
time; 2 when the spec is invalid or does not fit this machine. Errors are one line each.
"""

import sys

from bbld import spec
from bbld.engine import StartError, load, prepare, run

USAGE = """usage: python -m bbld.engine [--check] SPEC [-- ARGS...]

Run the sandbox described by SPEC (a .toml or .json file, or - for JSON on stdin) in the
foreground. ARGS are appended to the main command. --check only validates SPEC."""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    check_only = argv[0] == "--check"
    if check_only:
        argv = argv[1:]
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
        return run(sandbox, rest[1:])
    except spec.SpecError as exc:
        for problem in exc.problems:
            print(f"bbl: {problem}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"bbl: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
