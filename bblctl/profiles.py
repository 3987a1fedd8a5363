"""`bblctl start PROFILE` and `bblctl profile list|show|validate`."""

import os
import sys

from bblctl.cli import UsageError, is_name, parse
from bblctl.client import SignalForwarder, connect, running_daemon


def start(argv: list[str]) -> int:
    """`PROFILE [--name N] [--detach] [-- ARGS...]`: foreground by default, with a pty made
    inside the sandbox when stdin is a terminal; --detach prints the instance id.

    With bbld running, the daemon finds and expands the profile with our environment (the
    client imports no spec). Otherwise it is expanded here, so that a bad profile starts no
    daemon."""
    flags, values, positional = parse(argv, {"--detach": False},
                                      {"--name": None, "--detach-key": None})
    if not positional:
        raise UsageError("start needs a profile name or file; see bblctl profile list")
    target, args = positional[0], positional[1:]
    if "/" in target or target.endswith(".toml"):
        target = os.path.abspath(target)  # a file: the daemon has another working directory
    new_name = values["--name"]
    if new_name is not None and not is_name(new_name):
        raise UsageError(f"--name {new_name!r}: use letters, digits, . _ -")
    tty = flags["--detach"] or os.isatty(0)  # detached: the monitor holds the terminal
    key = _detach_key(values["--detach-key"]) \
        if (tty and not flags["--detach"]) or values["--detach-key"] is not None else None
    conn = running_daemon()
    notices: list[str] = []  # (the profile's, when it is expanded here)
    if conn is None:
        request = {"spec": _local_spec(target, new_name, tty, notices)}
    else:
        request = {"profile": target, "tty": tty, **({"name": new_name} if new_name else {})}
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    stdio = (null, null, null) if flags["--detach"] else (0, 1, 2)
    try:
        with SignalForwarder() as forwarder, conn or connect() as conn:
            replies = conn.stream("io.bbl.Manager.Run", fds=(*stdio, cwd), args=args,
                                  env=dict(os.environ), detach=flags["--detach"], **request)
            for reply in replies:
                if reply["event"] == "started":
                    for notice in notices + (reply.get("notices") or []):
                        print(f"bblctl: notice: {notice}", file=sys.stderr)
                if reply["event"] in ("started", "forwarded") and flags["--detach"]:
                    print(reply["id"])
                    return 0
                if reply["event"] == "forwarded":  # to the running single instance
                    forwarder.aim(id=reply["id"], pid=reply["pid"])
                elif reply["event"] == "started":
                    forwarder.aim(id=reply["id"])
                    if reply.get("tty") and conn.fds:
                        from bblctl.terminal import ENDED, attach_terminal, said_detached

                        how = attach_terminal(conn.fds.pop(0), conn.sock, console=True, key=key)
                        if how != ENDED:  # (the app runs on)
                            return said_detached(how, reply["id"])
                elif reply["event"] == "exited":
                    return reply["status"]
    finally:
        os.close(null)
        os.close(cwd)
    return 1


def _detach_key(name: str | None) -> bytes | None:
    from bblctl.terminal import detach_key  # (its imports: only on a terminal)

    try:
        return detach_key(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _local_spec(target: str, name: str | None, tty: bool, notices: list[str]) -> str:
    from bbld import profile

    try:
        return profile.spec_for_start(target, dict(os.environ), name, tty, notices)
    except profile.ProfileError as exc:
        raise UsageError("\n".join(exc.problems)) from None


def _load(name: str):
    from bbld import profile

    try:
        return profile.load(profile.find(name))
    except profile.ProfileError as exc:
        raise UsageError("\n".join(exc.problems)) from None


def profile_command(argv: list[str]) -> int:
    from bbld import profile

    if not argv or argv[0] not in ("list", "show", "validate"):
        raise UsageError("use `bblctl profile list`, `show NAME [--expanded]` or "
                         "`validate FILE|NAME`")
    command, argv = argv[0], argv[1:]
    flags, _, positional = parse(argv, {"--expanded": False}, {})
    if command == "list":
        return _list(profile)
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
        import msgspec

        print(msgspec.json.format(msgspec.json.encode(_load(path)).decode(), indent=2))
    else:
        with open(path) as f:
            sys.stdout.write(f.read())
    return 0


def _list(profile) -> int:
    """Each profile: its name, the instance name it gives, whether its words are right (its
    first problem, else "ok": `validate` also asks the host), and its file."""
    rows = [("PROFILE", "INSTANCE", "STATE", "FILE")]
    for name, path in profile.available().items():
        try:
            instance, state = profile.checked_name(path), "ok"
        except profile.ProfileError as exc:
            instance = "-"
            problem = exc.problems[0].split(": ", 1)[-1] if exc.problems else "broken"
            state = f"broken: {problem[:60]}{'…' if len(problem) > 60 else ''}"
        rows.append((name, instance, state, path))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for row in rows:
        print(f"{row[0]:{widths[0]}}  {row[1]:{widths[1]}}  {row[3]}  {row[2]}")
    return 0


def _find(name: str) -> str:
    from bbld import profile

    try:
        return profile.find(name)
    except profile.ProfileError as exc:
        raise UsageError("\n".join(exc.problems)) from None
