"""`bblctl COMMAND ...`: the client's command line."""

import sys

USAGE = """usage: bblctl COMMAND [ARGS...]

commands:
  run [bubblewrap options] [--] COMMAND [ARGS...]
                 run a command in a sandbox described by a bubblewrap command line,
                 as an instance of the daemon (bbld; started when needed)

The other commands (start, ps, tree, attach, exec, send-args, stop, kill, profile, desktop)
are not built yet."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "run":
        from bblctl.run import main as run

        return run(argv[1:], "bblctl run")
    print(f"bblctl: unknown command {argv[0]!r}; see bblctl --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
