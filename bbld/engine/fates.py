"""What becomes of each layer's supervisor once its layer is built: the layer's fate, decided
by one pure function of the spec (no I/O), so that every combination is tested as a table
(tests/test_fates.py) and whoever needs it reads it (the supervisors, the engine's caller,
`bblctl tree`).

- supervise: its supervisor stays: it runs the layer's commands (or holds its lock files),
  relays signals, reaps, and ends the layer;
- step-aside: no process once built: the supervisor exits and the kernel reparents its
  sub-layers (no pid namespace of its own, nothing to run);
- inline: no process at all: its parent's supervisor makes its (empty) mount namespace,
  reports it and clones its sub-layers from there;
- retire: pid 1 of its own pid namespace with nothing of its own to run and no command in
  that namespace: it execs a minimal init;
- replaced: the command itself: the supervisor execs it (the spec's
  command_replaces_supervisor, or a main layer with nothing else to do).

Idle supervisors only leave when layer 1 has a pid namespace (its end takes everything along)
and the main command keeps its supervisor: the engine's caller then signals and follows the
main command's layer itself. A main layer is only replaced where nothing left. The costs they
save are in docs/performance.md.
"""

from typing import Literal

from bbld import spec

Fate = Literal["supervise", "step-aside", "inline", "retire", "replaced"]
LEAVES = ("step-aside", "inline", "retire")  # fates without a supervisor that stays


def decide(root: spec.Layer, main: str) -> dict[str, Fate]:
    """Each layer's fate, by name. `main`: the layer of the instance's main command."""
    fates: dict[str, Fate] = {layer.name: "replaced" if layer.command_replaces_supervisor
                              else "supervise" for layer, _ in spec.walk(root)}
    if "pid" in root.namespaces and fates[main] != "replaced":
        _idle_supervisors_leave(root, fates, top=True)
    if not any(fate in LEAVES for fate in fates.values()):
        main_layer = spec.path_to(root, main)[-1]
        if "pid" not in main_layer.namespaces and not spec.needs_supervisor(main_layer) \
                and not main_layer.command.tty:
            fates[main] = "replaced"
    return fates


def _idle_supervisors_leave(layer: spec.Layer, fates: dict[str, Fate], top: bool) -> None:
    """A supervisor is idle once its layer is built if the layer runs nothing and holds no
    lock. With a pid namespace it retires, if it has sub-layers (else it just ends with its
    layer) and no command runs in its namespace (a retired init is dumpable again); without
    one it steps aside, and with nothing but an empty mount namespace to make it is inline."""
    idle = not _runs_commands(layer) and not layer.lock_files
    if "pid" in layer.namespaces:
        if idle and layer.layers and not _commands_see(layer):
            fates[layer.name] = "retire"
    elif idle:
        fates[layer.name] = "inline" if not top and _only_an_empty_mount(layer) \
            else "step-aside"
    for child in layer.layers:
        _idle_supervisors_leave(child, fates, top=False)


def _runs_commands(layer: spec.Layer) -> bool:
    return layer.command is not None or bool(layer.companions)


def _commands_see(layer: spec.Layer) -> bool:
    """Commands run in `layer`'s pid namespace: its own, or those of sub-layers without a pid
    namespace of their own, and so on down."""
    return _runs_commands(layer) or any(_commands_see(child) for child in layer.layers
                                        if "pid" not in child.namespaces)


def _only_an_empty_mount(layer: spec.Layer) -> bool:
    return layer.namespaces == ["mount"] and not layer.fs and not layer.new_root \
        and layer.pids_limit is None and layer.resources is None \
        and not layer.start_after \
        and layer.user_namespaces == "allow"
