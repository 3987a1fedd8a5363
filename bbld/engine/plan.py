"""Turning a checked spec into a run plan, in the engine's caller, before anything forks.

Everything that can fail early fails here, with exit code 2 and nothing started: data fds
are read, seccomp policies compiled, fds checked. The plan is then inherited in memory by
every forked layer: no interpreter re-exec, no config files.
"""

from __future__ import annotations

import os

import msgspec
from msgspec import Struct, field

from bbld import spec
from bbld.engine import fates, privileges, seccomp
from bbld.engine.errors import EXIT_USAGE, StartError


class LayerPlan(Struct, kw_only=True):
    layer: spec.Layer
    children: list["LayerPlan"]
    data: dict[int, bytes] = field(default_factory=dict)  # file/bind-data bytes by op index
    seccomp: list[bytes] = field(default_factory=list)  # programs, loaded in this order
    caps: frozenset[int] = frozenset()
    runs_main: bool = False  # this layer's command is the instance's main command
    main_child: LayerPlan | None = None  # the sub-layer on the way to the main command
    gated: bool = False  # waits for a socket (itself or an ancestor): not in the start barrier
    fds: frozenset[int] = frozenset()  # caller fds this layer's subtree still needs
    cgroup_fd: int | None = None  # its limits' cgroup (engine.cgroups), set by the monitor
    fate: fates.Fate = "supervise"  # what its supervisor becomes once built (engine.fates)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def steps_aside(self) -> bool:
        """No supervisor once built, none of its own pid namespace (step-aside, inline)."""
        return self.fate in ("step-aside", "inline")

    @property
    def retires(self) -> bool:
        return self.fate == "retire"

    @property
    def inline(self) -> bool:
        return self.fate == "inline"

    @property
    def replaced(self) -> bool:
        return self.fate == "replaced"

    @property
    def runs_commands(self) -> bool:
        """The layer has a command or companions of its own to start."""
        return self.layer.command is not None or bool(self.layer.companions)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


class Plan(Struct, kw_only=True):
    sandbox: spec.Sandbox
    root: LayerPlan
    umask: int
    cap_last: int

    def layers(self):
        return self.root.walk()

    @property
    def main(self) -> LayerPlan:
        """The layer that runs the instance's main command."""
        return next(plan for plan in self.layers() if plan.runs_main)

    @property
    def direct(self) -> bool:
        """Layer 1 has a pid namespace (its end takes everything along) and the main command
        does not replace its layer's supervisor: then the engine's caller signals and follows
        the main command's layer itself, and idle supervisors leave (engine.fates)."""
        return "pid" in self.root.layer.namespaces and not self.main.replaced

    @property
    def adopts_orphans(self) -> bool:
        """Layer 1 has no pid namespace: the engine's caller is a child subreaper, so that
        what the sandbox leaves behind comes back to it, not to the host's init
        (monitor.Instance._reap_orphans), even once layer 1's process is gone."""
        return "pid" not in self.root.layer.namespaces

    def path_to(self, name: str) -> list[LayerPlan]:
        """The layer plans from layer 1 down to `name` (empty if there is none)."""
        plans = {plan.name: plan for plan in self.layers()}
        return [plans[layer.name] for layer in spec.path_to(self.sandbox.layer, name)]

    def environment(self, name: str, base: dict[str, str]) -> tuple[dict[str, str], str | None]:
        """The environment and explicit cwd the commands of layer `name` start from, given
        what layer 1 started from: every layer's env changes on the way down, in order."""
        env, cwd = dict(base), None
        for node in self.path_to(name):
            if node.layer.env.clear:
                env = {}
            for key in node.layer.env.unset:
                env.pop(key, None)
            env.update(node.layer.env.set)
            cwd = node.layer.cwd or cwd
        return env, cwd


def prepare(sandbox: spec.Sandbox, args: list[str] = ()) -> Plan:
    """Check the spec against this caller and build the plan. Raises SpecError/StartError."""
    spec.check(sandbox, os.getuid(), os.getgid(), known_policies=seccomp.POLICIES)
    join = sandbox.layer.join or spec.Join()
    for fd in (sandbox.info_fd, sandbox.json_status_fd, sandbox.block_fd, sandbox.sync_fd,
               sandbox.userns_block_fd, join.user, join.pid):
        if fd is not None:
            _check_fd_open(sandbox.layer.name, fd)
    main = spec.main_layer_name(sandbox)
    main_path = {layer.name for layer in spec.path_to(sandbox.layer, main)}
    root = _plan_layer(sandbox.layer, main, main_path, gated=False)
    if args:
        main_plan = next(p for p in root.walk() if p.runs_main)
        command = main_plan.layer.command
        argv = list(args) if command.args_replace else [*command.argv, *args]
        command = msgspec.structs.replace(command, argv=argv, args_replace=False)
        main_plan.layer = msgspec.structs.replace(main_plan.layer, command=command)
    umask = os.umask(0)
    os.umask(umask)
    decided = fates.decide(sandbox.layer, main)
    for node in root.walk():
        node.fate = decided[node.name]
    return Plan(sandbox=sandbox, root=root, umask=umask, cap_last=privileges.cap_last())


def _plan_layer(layer: spec.Layer, main: str, main_path: set[str], gated: bool) -> LayerPlan:
    gated = gated or bool(layer.start_after)
    if gated and layer.network is not None:  # (it is set up before the go, gated layers later)
        raise StartError(f"layer '{layer.name}': network: not in a layer that waits for a "
                         "socket (start_after, its own or an ancestor's)", EXIT_USAGE)
    children = [_plan_layer(child, main, main_path, gated) for child in layer.layers]
    plan = LayerPlan(layer=layer, children=children, gated=gated, runs_main=layer.name == main)
    plan.main_child = next((c for c in children if c.name in main_path), None)
    plan.data = {i: _read_data(layer.name, i, op) for i, op in enumerate(layer.fs)
                 if isinstance(op, (spec.File, spec.BindData, spec.RoBindData))}
    plan.caps = frozenset(spec.capability_number(name) for name in layer.caps)
    if layer.seccomp:
        if layer.seccomp.policy:
            try:
                plan.seccomp.append(seccomp.compile_policy(
                    layer.seccomp.policy, layer.seccomp.extend, layer.seccomp.relax))
            except OSError as exc:
                raise StartError(f"layer '{layer.name}': seccomp policy "
                                 f"{layer.seccomp.policy!r}: {exc.strerror}") from None
        plan.seccomp.extend(layer.seccomp.programs)
    own_fds = {op.fd for op in layer.fs if isinstance(op, spec.BindFd)}
    commands = ([layer.command] if layer.command else []) + list(layer.companions)
    own_fds.update(fd for command in commands for fd in command.pass_fds)
    for fd in own_fds:
        _check_fd_open(layer.name, fd)
    plan.fds = frozenset(own_fds).union(*(c.fds for c in children))
    return plan


def _check_fd_open(layer: str, fd: int) -> None:
    try:
        os.fstat(fd)
    except OSError:
        raise StartError(f"layer '{layer}': fd {fd} is not open in the caller", EXIT_USAGE) \
            from None


def _read_data(layer: str, index: int, op) -> bytes:
    if op.content is not None:
        return op.content.encode()
    if op.data is not None:
        return op.data
    _check_fd_open(layer, op.fd)
    chunks = []
    try:
        while chunk := os.read(op.fd, 1 << 16):
            chunks.append(chunk)
    except OSError as exc:
        raise StartError(f"layer '{layer}': fs[{index}] ({op.kind}): cannot read fd {op.fd}: "
                         f"{exc.strerror}", EXIT_USAGE) from None
    return b"".join(chunks)

