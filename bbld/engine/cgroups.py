"""Per-layer pids limits, in a cgroup v2 subtree delegated to the user.

A layer with a `pids_limit` gets a cgroup of its own; the limit counts every process of the
layer and of the layers below it, which no rlimit can do (RLIMIT_NPROC counts per uid):

    $BBL_CGROUP/                     delegated to the user, holding no processes itself
        bbl-<monitor pid>-<n>/       the instance
            <layer>/                 pids.max = the layer's limit
                _self/               the layer's supervisor is cloned straight into it
                                     (CLONE_INTO_CGROUP), with its commands and sub-layers
                <lower layer>/       a limited layer further down: the same again
Processes live only in the `_self` leaves, as cgroup v2's no-internal-processes rule wants;
`_self` cannot clash with a layer name (those begin with a letter or digit). Everything is
removed when the instance ends. Without BBL_CGROUP a pids limit is a clear start error.
"""

from __future__ import annotations

import itertools
import os
import select

from bbld.engine.errors import EXIT_USAGE, StartError

ENV = "BBL_CGROUP"
LEAF = "_self"
_counter = itertools.count()


class Cgroups:
    """The cgroups of one instance's limited layers; sets each limited LayerPlan.cgroup_fd."""

    def __init__(self, plan):
        self.made: list[str] = []  # directories, parents first
        self.fds: list[int] = []
        limited = [node for node in plan.layers() if node.layer.pids_limit is not None]
        if not limited:
            return
        base = os.environ.get(ENV, "")
        if not base:
            raise StartError(f"layer '{limited[0].name}': pids_limit needs a delegated cgroup: "
                             f"set {ENV} in bbld's environment to a cgroup v2 directory you "
                             "own with the pids controller (see docs/security.md), or use the "
                             "nproc rlimit", EXIT_USAGE)
        try:
            _enable_pids(base)
            top = self._make(base, f"bbl-{os.getpid()}-{next(_counter)}")
            self._place(plan.root, top)
        except OSError as exc:
            self.remove()
            raise StartError(f"{ENV}={base}: {exc.filename or base}: {exc.strerror}; it must "
                             "be a cgroup v2 directory you own, with the pids controller and "
                             "no processes of its own", EXIT_USAGE) from None

    def _make(self, parent: str, name: str) -> str:
        path = os.path.join(parent, name)
        os.mkdir(path)
        self.made.append(path)
        return path

    def _place(self, node, parent: str) -> None:
        here = parent
        if node.layer.pids_limit is not None:
            _enable_pids(parent)
            here = self._make(parent, node.name)
            _write(here, "pids.max", str(node.layer.pids_limit))
            leaf = self._make(here, LEAF)
            node.cgroup_fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.fds.append(node.cgroup_fd)
        for child in node.children:
            self._place(child, here)

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


def _enable_pids(path: str) -> None:
    with open(os.path.join(path, "cgroup.subtree_control")) as f:
        if "pids" in f.read().split():
            return
    _write(path, "cgroup.subtree_control", "+pids")


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
