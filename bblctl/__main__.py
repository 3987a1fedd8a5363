"""`bblctl COMMAND ...`: the client's command line."""

import sys

# Each command: its synopsis and what it does. The one source of `bblctl --help`,
# `bblctl COMMAND --help`, the man page and the shell completions (bblctl.manual).
HELP = [
    ("run", "run [--name NAME [--single-instance]] [bubblewrap options] [--] COMMAND [ARGS...]",
     "run a command in a sandbox described by a bubblewrap command line, as an instance of "
     "the daemon (bbld; started when needed); with --single-instance, a second run with "
     "the same name hands its arguments to the running instance instead"),
    ("start", "start PROFILE [--name NAME] [--detach] [--detach-key KEY] [-- ARGS...]",
     "start a sandbox from a profile (a name, see `profile list`, or a file): in the "
     "foreground, with a terminal made inside the sandbox when stdin is one (Ctrl-] "
     "detaches from it and leaves the app running; `attach ID` shows it again); --detach "
     "prints the instance id and returns at once. ARGS are the app's arguments, or the "
     "command itself where the profile names none; --name is the instance's name and "
     "hostname. KEY: ctrl-X, ^X or none (default: $BBL_DETACH_KEY, else ctrl-])"),
    ("profile", "profile list | show NAME [--expanded] | validate FILE|NAME",
     "the profiles: list shows each one's instance name, file and state (ok, or broken and "
     "its first problem); show prints one (--expanded: the whole layer tree it means); "
     "validate reports every problem with file:line (exit 2)"),
    ("ps", "ps [--all] [--json] [--watch]",
     "list running instances and their memory use (--all: also recently ended ones, with "
     "status and cause; --watch: the running ones, then instances starting and ending, a "
     "line each)"),
    ("tree", "tree [ID] [--json]",
     "the layer tree of each running instance, with its processes"),
    ("exec", "exec [--layer NAME] ID [--] COMMAND [ARGS...]",
     "run a command in a layer of a running instance (default: the main command's layer), "
     "with exactly that layer's restrictions"),
    ("attach", "attach [--new] [--layer NAME] [--detach-key KEY] ID [-- COMMAND [ARGS...]]",
     "show the app's own terminal, if it has one (started on a terminal, or with --detach): "
     "the last 64 KiB it wrote come first, Ctrl-] (or KEY) detaches and "
     "leaves it running, a second attach takes the terminal over, and the status is the "
     "app's if it ends meanwhile. With --new, a layer or a command (or for an app without "
     "a terminal): a new terminal made inside the sandbox with that command, a shell by "
     "default, which ends with this attach"),
    ("send-args", "send-args ID [--] ARGS...",
     "hand arguments to a running instance: its main program runs again in its main "
     "layer with them (or the spec's send_args command)"),
    ("stop", "stop ID [--timeout SECONDS]",
     "SIGTERM to the main command (and, if it ignores that on a terminal of its own, as an "
     "interactive shell does, a hangup of the terminal); SIGKILL to the whole tree after "
     "the timeout (default 10); says which it took"),
    ("kill", "kill ID [--signal SIG]",
     "send a signal to the main command (default KILL; 0: only check that it runs)"),
    ("desktop", "desktop install PROFILE [--from APP.desktop]",
     "a menu launcher (~/.local/share/applications) that starts the profile; --from takes "
     "the original entry's id, names, icon and MIME types"),
    ("daemon", "daemon status [--json] | stop",
     "whether bbld runs (pid, version, how it started, socket, instances); stop ends it, "
     "its instances run on (the next bbld adopts them)"),
    ("setup", "setup [--remove]",
     "make this install ready to use: bblctl, bbl-bwrap and bbld in ~/.local/bin, the "
     "systemd user units installed and enabled (or undo it)"),
    ("doctor", "doctor [--json]",
     "check what BBL needs on this machine, a line each, with the fix"),
]
IDS = ("ID is an instance's id, a unique prefix of it, or a name only one running instance "
       "has (see bblctl ps).")


def _wrap(text: str, indent: int) -> str:
    import textwrap  # (only for help)

    return textwrap.fill(text, 88, initial_indent=" " * indent, subsequent_indent=" " * indent,
                         break_on_hyphens=False)


def usage() -> str:
    lines = ["usage: bblctl COMMAND [ARGS...]", "", "commands:"]
    for _, synopsis, text in HELP:
        lines += [f"  {synopsis}", _wrap(text, 17)]
    lines += ["  --version      print BBL's version", "", _wrap(IDS, 0),
              "`bblctl COMMAND --help` says more of one command."]
    return "\n".join(lines)


def command_help(name: str) -> str:
    synopsis, text = next((s, t) for n, s, t in HELP if n == name)
    return f"usage: bblctl {synopsis}\n\n{_wrap(text, 0)}\n\n{_wrap(IDS, 0)}"


COMMANDS = {"ps": ("bblctl.manage", "ps"), "tree": ("bblctl.manage", "tree"),
            "stop": ("bblctl.manage", "stop"), "kill": ("bblctl.manage", "kill"),
            "exec": ("bblctl.enter", "exec_"), "attach": ("bblctl.enter", "attach"),
            "send-args": ("bblctl.enter", "send_args"),
            "start": ("bblctl.profiles", "start"),
            "profile": ("bblctl.profiles", "profile_command"),
            "desktop": ("bblctl.desktop", "desktop"),
            "daemon": ("bblctl.daemon", "daemon"), "setup": ("bblctl.setup", "setup"),
            "doctor": ("bblctl.doctor", "doctor")}


def entry() -> None:
    """The `bblctl` script's entry point."""
    from bblctl.cli import exit_now

    exit_now(main)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from bbld import __version__

        print(f"bblctl {__version__}")
        return 0
    if argv[0] == "run":
        from bblctl.run import main as run

        return run(argv[1:], "bblctl run")
    if argv[0] not in COMMANDS:
        print(f"bblctl: unknown command {argv[0]!r}; see bblctl --help", file=sys.stderr)
        return 2
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if "--help" in options or "-h" in options:  # (before anything runs: no daemon start)
        print(command_help(argv[0]))
        return 0
    from bblctl.cli import UsageError, report
    from bblctl.client import ClientError

    module, function = COMMANDS[argv[0]]
    try:  # (__import__, not importlib: that imports warnings too, on every call)
        return getattr(__import__(module, fromlist=[function]), function)(argv[1:])
    except UsageError as exc:
        hint = f"; see bblctl {argv[0]} --help" if str(exc).startswith("unknown option") \
            else ""
        print(f"bblctl {argv[0]}: {exc}{hint}", file=sys.stderr)
        return 2
    except ClientError as exc:
        return report(exc)


if __name__ == "__main__":
    entry()
