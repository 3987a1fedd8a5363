"""Where the per-user daemon lives: its runtime directory and socket. Shared by bbld and bblctl
(no trio, no engine).

`$XDG_RUNTIME_DIR/bbl/` when that variable is set; otherwise `~/.local/state/bbl/run/`, inside
the user's own home, never a fixed path in a shared directory that another user could create
first. The directory is created 0700 and is refused unless it is a real directory owned by the
user with no access for anyone else.
"""

import os
import stat


class UnsafeDirectory(Exception):
    """The runtime directory exists but is not safe to use; the message says how to fix it."""


def runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        return os.path.join(base, "bbl")
    home = os.environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "bbl", "run")


def socket_path() -> str:
    return os.path.join(runtime_dir(), "bbld.sock")


def instances_dir() -> str:
    """Where running instances keep their control sockets (see bbld.daemon.control)."""
    return os.path.join(runtime_dir(), "instances")


def ensure_runtime_dir(path: str | None = None) -> str:
    """Create (0700) or check the runtime directory; raises UnsafeDirectory."""
    path = path or runtime_dir()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory; remove it and try again")
    if info.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} belongs to uid {info.st_uid}, not to you; remove it")
    if info.st_mode & 0o077:
        raise UnsafeDirectory(f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; "
                              f"run `chmod 700 {path}`")
    return path
