"""Per-layer limits (pids, memory, CPU, IO), in a cgroup v2 subtree delegated to the user.

A layer with a `pids_limit` or `resources` gets a cgroup of its own; its limits count every
process of the layer and of the layers below it, which no rlimit can do (RLIMIT_NPROC counts
per uid, RLIMIT_AS per process):

    $BBL_CGROUP/                     delegated to the user, holding no processes itself
        bbl-<monitor pid>-<n>/       the instance
            <layer>/                 pids.max, memory.max, cpu.max, ... (`settings`)
                _self/               the layer's supervisor is cloned straight into it
                                     (CLONE_INTO_CGROUP), with its commands and sub-layers
                <lower layer>/       a limited layer further down: the same again
Processes live only in the `_self` leaves, as cgroup v2's no-internal-processes rule wants;
`_self` cannot clash with a layer name (those begin with a letter or digit). Everything is
removed when the instance ends. Without BBL_CGROUP (bbld sets it to its own delegated cgroup
when systemd gives it one: bbld.cgroupfs), or without a controller a limit needs, the start
is refused in one line: never silently unlimited.
"""

from __future__ import annotations

import itertools
import os
import select

from bbld import cgroupfs
from bbld.engine.errors import EXIT_USAGE, StartError

ENV = cgroupfs.ENV
LEAF = "_self"
PERIOD = 100_000  # µs: cpu.max's period
_counter = itertools.count()


def settings(layer) -> dict[str, str]:
    """The cgroup files a layer's limits write, and what: `pids_limit` and `resources`."""
    found = {}
    if layer.pids_limit is not None:
        found["pids.max"] = str(layer.pids_limit)
    r = layer.resources
    if r is None:
        return found
    if r.memory is not None:
        found["memory.max"] = str(r.memory)
    if r.memory_high is not None:
        found["memory.high"] = str(r.memory_high)
    swap = r.swap if r.swap is not None else r.memory
    if swap is not None:
        found["memory.swap.max"] = str(swap)
    if r.cpu is not None:
        found["cpu.max"] = f"{max(1000, round(r.cpu * PERIOD))} {PERIOD}"
    if r.io_weight is not None:
        found["io.weight"] = f"default {r.io_weight}"
    return found


_WHY = {"io.weight": "io_weight needs the BFQ I/O scheduler on the disk, or io.cost",
        "memory.swap.max": "swap accounting is off"}


def controllers(files) -> list[str]:
    """The controllers the files belong to, in a stable order."""
    return sorted({name.split(".")[0] for name in files})


class Cgroups:
    """The cgroups of one instance's limited layers; sets each limited LayerPlan.cgroup_fd."""

    def __init__(self, plan):
        self.made: list[str] = []  # directories, parents first
        self.fds: list[int] = []
        self.paths: dict[str, str] = {}  # a limited layer's name: its cgroup
        files = {node.name: settings(node.layer) for node in plan.layers()}
        limited = [node for node in plan.layers() if files[node.name]]
        if not limited:
            return
        needed = controllers(f for node in limited for f in files[node.name])
        base = os.environ.get(ENV, "")
        first = f"layer '{limited[0].name}': {' and '.join(needed)} limits"
        if not base:
            raise StartError(f"{first} need a delegated cgroup: run bbld as the systemd user "
                             f"service (Delegate=yes), or set {ENV} in bbld's environment to "
                             "a cgroup v2 directory you own (docs/security.md, \"Resource "
                             "limits\")", EXIT_USAGE)
        if not os.path.isfile(os.path.join(base, "cgroup.controllers")):
            raise StartError(f"{ENV}={base}: not a cgroup v2 directory (no cgroup.controllers);"
                             " it must be a cgroup v2 directory you own, with no processes of "
                             "its own", EXIT_USAGE)
        missing = [c for c in needed if c not in cgroupfs.controllers(base)]
        if missing:
            raise StartError(f"{first}: the delegated cgroup {base} has no "
                             f"{' or '.join(missing)} controller (it has: "
                             f"{' '.join(cgroupfs.controllers(base)) or 'none'}): "
                             f"{cgroupfs.FIX}", EXIT_USAGE)
        try:
            _enable(base, needed)
            top = self._make(base, f"bbl-{os.getpid()}-{next(_counter)}")
            self._place(plan.root, top, needed, files)
        except StartError:
            self.remove()
            raise
        except OSError as exc:
            self.remove()
            raise StartError(f"{ENV}={base}: {exc.filename or base}: {exc.strerror}; it must "
                             f"be a cgroup v2 directory you own, with the {' '.join(needed)} "
                             "controllers and no processes of its own", EXIT_USAGE) from None

    def _make(self, parent: str, name: str) -> str:
        path = os.path.join(parent, name)
        os.mkdir(path)
        self.made.append(path)
        return path

    def _place(self, node, parent: str, needed: list[str], all_files: dict) -> None:
        here = parent
        files = all_files[node.name]
        if files:
            _enable(parent, needed)
            here = self._make(parent, node.name)
            self.paths[node.name] = here
            for name, value in files.items():
                if not os.path.exists(os.path.join(here, name)):
                    if name == "memory.swap.max" and node.layer.resources.swap is None:
                        continue  # (a kernel without swap accounting: memory.max alone)
                    raise StartError(f"layer '{node.name}': this kernel's cgroups have no "
                                     f"{name} ({_WHY.get(name, 'not built in')})", EXIT_USAGE)
                _write(here, name, value)
            leaf = self._make(here, LEAF)
            node.cgroup_fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.fds.append(node.cgroup_fd)
        for child in node.children:
            self._place(child, here, needed, all_files)

    def cause(self) -> str | None:
        """Why the instance ended, if a limit ended it: the memory limit's OOM kills."""
        return cause_of(self.paths.values())

    def remove(self) -> None:
        """Once the instance has ended: kill stragglers (layers without a pid namespace die
        by their parent-death signal, a moment later), then remove the directories."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if not self.made:
            return
        top = self.made[0]
        try:
            if _populated(top):
                _write(top, "cgroup.kill", "1")
                _wait_unpopulated(top, timeout_ms=5000)
        except OSError:
            pass  # no cgroup.kill before Linux 5.14: the rmdir below says what is left
        for path in reversed(self.made):
            try:
                os.rmdir(path)
            except OSError:
                pass  # best effort at the end of an instance: nothing to report it to
        self.made.clear()


def cause_of(paths) -> str | None:
    """"out of memory ..." when the kernel's OOM killer ended processes in these cgroups
    (their memory.events' oom_kill; cgroups without the memory controller have none)."""
    killed = 0
    for path in paths:
        try:
            with open(os.path.join(path, "memory.events")) as f:
                counts = dict(line.split() for line in f if line.strip())
        except (OSError, ValueError):
            continue
        killed += int(counts.get("oom_kill", 0))
    if not killed:
        return None
    return f"out of memory: limits.memory reached, {killed} process" + \
        ("es" if killed > 1 else "") + " killed"


def _enable(path: str, needed: list[str]) -> None:
    """The controllers given to the cgroups below `path` (what is enabled stays)."""
    with open(os.path.join(path, "cgroup.subtree_control")) as f:
        missing = [c for c in needed if c not in f.read().split()]
    if missing:
        _write(path, "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def _write(directory: str, name: str, text: str) -> None:
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _populated(path: str) -> bool:
    with open(os.path.join(path, "cgroup.events")) as f:
        return "populated 1" in f.read()


def _wait_unpopulated(path: str, timeout_ms: int) -> None:
    """cgroup.events signals a change with POLLPRI: no polling loop."""
    with open(os.path.join(path, "cgroup.events")) as f:
        poller = select.poll()
        poller.register(f, select.POLLPRI)
        while True:
            f.seek(0)
            if "populated 0" in f.read() or not poller.poll(timeout_ms):
                return
