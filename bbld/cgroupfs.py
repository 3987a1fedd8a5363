"""Where BBL's cgroups live: a cgroup v2 subtree delegated to the user.

`BBL_CGROUP` in bbld's environment names it. Without it, bbld looks at its own cgroup: run as
the systemd user service, whose unit says `Delegate=yes`, that cgroup is the user's to manage,
and bbld, alone there, makes it the base (`claim`): it moves itself into a leaf, `daemon`
(where the monitors it starts live too), so that the base holds no processes (cgroup v2's
no-internal-processes rule), gives the base's children the controllers it has, and sets
BBL_CGROUP for the monitors it starts. Shared by the daemon, the engine, the profile checks
and `bblctl doctor`; no trio.
"""

from __future__ import annotations

import os

ENV = "BBL_CGROUP"
LEAF = "daemon"  # bbld's own leaf in a cgroup it claimed
WANTED = ("pids", "memory", "cpu", "io")
FIX = ("delegate it: run bbld as the systemd user service (its unit says Delegate=yes; on "
       "cgroup v1 hosts the controller stays with v1), or point BBL_CGROUP at a cgroup v2 "
       "directory of yours that has it (docs/security.md, \"Resource limits\")")


def own_cgroup() -> str | None:
    """This process's cgroup v2 directory, None where cgroup2 is not mounted."""
    try:
        with open("/proc/self/mountinfo") as f:
            roots = [line.split()[4] for line in f
                     if line.split(" - ")[1].startswith("cgroup2 ")]
        with open("/proc/self/cgroup") as f:
            path = next((line[3:].strip() for line in f if line.startswith("0::")), None)
    except (OSError, IndexError):
        return None
    if not roots or path is None:
        return None
    return os.path.normpath(roots[0] + path)


def controllers(path: str) -> list[str]:
    """The controllers cgroup `path` can give its children ([] when it is no cgroup)."""
    try:
        with open(os.path.join(path, "cgroup.controllers")) as f:
            return f.read().split()
    except OSError:
        return []


def base(environ=None) -> str | None:
    """The delegated cgroup instances are made in (BBL_CGROUP), None without one."""
    return (os.environ if environ is None else environ).get(ENV) or None


def delegated(path: str) -> bool:
    """Whether `path` is the user's to manage: its directory and the files that move
    processes and give controllers are writable (systemd chowns them with Delegate=yes)."""
    return all(os.access(os.path.join(path, name), os.W_OK)
               for name in ("", "cgroup.procs", "cgroup.subtree_control"))


def claim() -> str | None:
    """With no BBL_CGROUP: make bbld's own cgroup the base where it is delegated and bbld is
    alone in it (as the systemd service is; see the module's docstring); returns it, or None
    (nothing changed)."""
    own = own_cgroup()
    if base() is not None or own is None:
        return None
    if os.path.basename(own) == LEAF and delegated(os.path.dirname(own)):
        own = os.path.dirname(own)  # (a restarted bbld, or DelegateSubgroup=daemon)
    else:
        try:
            with open(os.path.join(own, "cgroup.procs")) as f:
                alone = f.read().split() == [str(os.getpid())]
            if not alone or not delegated(own):
                return None
            leaf = os.path.join(own, LEAF)
            os.makedirs(leaf, exist_ok=True)
            _write(os.path.join(leaf, "cgroup.procs"), str(os.getpid()))
        except OSError:
            return None  # (not ours after all: instances with limits are refused in one line)
    wanted = [c for c in WANTED if c in controllers(own)]
    try:
        if wanted:
            _write(os.path.join(own, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in wanted))
    except OSError:
        return None
    os.environ[ENV] = own
    return own


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
