"""Where BBL's cgroups live: a cgroup v2 subtree delegated to the user.

`BBL_CGROUP` in bbld's environment names it. Without it, bbld looks at its own cgroup: run as
the systemd user service whose unit says `Delegate=yes` and `DelegateSubgroup=daemon`
(systemd 254 and later; `bblctl setup` writes both there), bbld runs in the leaf `daemon` of
a cgroup that is the user's to manage, and makes that cgroup the base (`claim`): it gives
the base's children the controllers it has, and sets BBL_CGROUP for the monitors it starts.
The base holds no process of its own (cgroup v2's no-internal-processes rule): bbld and its
monitors live in `daemon`. Not with older systemd: bbld would have to move itself out of the
unit's own cgroup, and systemd could then not start the next bbld there while instances run
(it fails with 219/CGROUP, systemd issue 24064). Shared by the daemon, the engine, the
profile checks and `bblctl doctor`; no trio.
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


def usage(path: str) -> dict[str, int]:
    """What a cgroup uses now: memory (bytes), pids, cpu_usec (CPU time so far), as far as
    its controllers count them."""
    found = {}
    for key, name in (("memory", "memory.current"), ("pids", "pids.current")):
        try:
            with open(os.path.join(path, name)) as f:
                found[key] = int(f.read())
        except (OSError, ValueError):
            pass
    try:
        with open(os.path.join(path, "cpu.stat")) as f:
            found["cpu_usec"] = int(dict(line.split() for line in f)["usage_usec"])
    except (OSError, ValueError, KeyError):
        pass
    return found


def base(environ=None) -> str | None:
    """The delegated cgroup instances are made in (BBL_CGROUP), None without one."""
    return (os.environ if environ is None else environ).get(ENV) or None


def delegated(path: str) -> bool:
    """Whether `path` is the user's to manage: its directory and the files that move
    processes and give controllers are writable (systemd chowns them with Delegate=yes)."""
    return all(os.access(os.path.join(path, name), os.W_OK)
               for name in ("", "cgroup.procs", "cgroup.subtree_control"))


def claim() -> str | None:
    """With no BBL_CGROUP: bbld's own cgroup's parent as the base, where bbld runs in its
    leaf `daemon` of a delegated cgroup (see the module's docstring); returns it, or None
    (nothing changed)."""
    own = own_cgroup()
    if base() is not None or own is None or os.path.basename(own) != LEAF:
        return None
    parent = os.path.dirname(own)
    if not delegated(parent):
        return None
    wanted = [c for c in WANTED if c in controllers(parent)]
    try:
        if wanted:
            _write(os.path.join(parent, "cgroup.subtree_control"),
                   " ".join(f"+{c}" for c in wanted))
    except OSError:
        return None  # (not ours after all: instances with limits are refused in one line)
    os.environ[ENV] = parent
    return parent


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
