"""Where the per-user daemon lives: its runtime directory and socket, and BBL's state
directory. Shared by bbld and bblctl (no trio, no engine).

One place per user, whatever the environment says, so that the same uid always reaches the
same daemon: `$XDG_RUNTIME_DIR/bbl/` when that variable is set (logind sets it to
`/run/user/UID`); without it (`su -`, ssh without pam_systemd, cron) `/run/user/UID/bbl/` all
the same when that directory exists and is the user's alone; only otherwise
`~/.local/state/bbl/run/`, inside the user's own home, never a fixed path in a shared
directory that another user could create first. Directories are created 0700 and refused
unless they are the user's and nobody else can change them (private_directory).
"""

import os
import stat


class UnsafeDirectory(Exception):
    """The runtime directory exists but is not safe to use; the message says how to fix it."""


LOGIND_RUNTIME = "/run/user/{uid}"  # what pam_systemd sets XDG_RUNTIME_DIR to


def runtime_dir(environ: dict[str, str] | None = None) -> str:
    """The runtime directory `environ` (default: ours) means."""
    base = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        return os.path.join(base, "bbl")
    logind = LOGIND_RUNTIME.format(uid=os.getuid())
    try:
        info = os.lstat(logind)
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() \
                and not info.st_mode & 0o077:
            return os.path.join(logind, "bbl")
    except OSError:
        pass
    return os.path.join(home(environ), ".local", "state", "bbl", "run")


def state_dir() -> str:
    """`$XDG_STATE_HOME/bbl` (default `~/.local/state/bbl`): the autostart's lock, bbld's log
    when a client started it, the history of ended instances."""
    base = os.environ.get("XDG_STATE_HOME")
    if not (base and os.path.isabs(base)):
        base = os.path.join(home(), ".local", "state")
    return os.path.join(base, "bbl")


def home(environ: dict[str, str] | None = None) -> str:
    home = (os.environ if environ is None else environ).get("HOME")
    return home if home and os.path.isabs(home) else os.path.expanduser("~")


def socket_path() -> str:
    return os.path.join(runtime_dir(), "bbld.sock")


def instances_dir() -> str:
    """Where running instances keep their control sockets (see bbld.monitors.control)."""
    return os.path.join(runtime_dir(), "instances")


def ensure_runtime_dir(path: str | None = None) -> str:
    """Create (0700) or check the runtime directory; raises UnsafeDirectory."""
    return private_directory(path or runtime_dir(), closed=0o077)


def private_directory(path: str, closed: int = 0o022) -> str:
    """`path` as a directory only the user can change: created (0700, with its parents) where
    missing; refused with UnsafeDirectory (one line: what, where, how to fix) unless it is
    a real directory of the user's without the `closed` mode bits (by default: nobody else
    may write it), reached through directories nobody else can change (below)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory; remove it and try again")
    _check_owned(path, info, closed)
    check_parents(path)
    return path


def check_private_file(path: str, info: os.stat_result) -> None:
    """A file BBL trusts (a profile): the user's (or root's), writable by nobody else, in
    directories nobody else can change. Raises UnsafeDirectory."""
    if info.st_uid != 0:
        _check_owned(path, info, 0o022)
    elif info.st_mode & 0o022:
        raise UnsafeDirectory(f"{path} may be written by others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); run `chmod go-w {path}`")
    check_parents(path)


def check_parents(path: str) -> None:
    """Every directory that leads to `path` must be root's or the user's, and writable by
    nobody else unless it is sticky (as /tmp is: there others cannot rename or remove what
    is ours): anyone else could otherwise swap what lies below for something of theirs."""
    real = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    parts = real.split("/")
    for depth in range(1, len(parts) + 1):
        parent = "/".join(parts[:depth]) or "/"
        info = os.lstat(parent)
        if info.st_uid not in (0, os.getuid()):
            raise UnsafeDirectory(f"{path}: {parent} on its way belongs to uid {info.st_uid}; "
                                  "use a directory of your own")
        if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(f"{path}: {parent} on its way may be written by anyone; "
                                  f"run `chmod o-w {parent}` or use another directory")


def _check_owned(path: str, info: os.stat_result, closed: int) -> None:
    if info.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} belongs to uid {info.st_uid}, not to you; remove it")
    if info.st_mode & closed:
        mode = stat.S_IMODE(info.st_mode)
        raise UnsafeDirectory(f"{path} has mode {mode:04o}; run "
                              f"`chmod {mode & ~closed & 0o7777:o} {path}`")
