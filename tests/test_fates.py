"""A layer's fate (bbld.engine.fates) for every combination the engine supports, as a table:
a pure function of the spec, no namespaces."""

import json

import msgspec
import pytest

from bbld import profile, spec
from bbld.engine import fates

CMD = {"argv": ["true"]}


def L(name, *layers, ns=("user", "mount", "pid"), command=False, **keys):  # noqa: N802
    """A layer; `command`: True for a plain one, or the command itself."""
    return {"name": name, "namespaces": list(ns), "layers": list(layers),
            **({"command": CMD if command is True else command} if command else {}), **keys}


def decided(root: dict, main: str | None = None) -> dict[str, str]:
    text = json.dumps({"layer": root, **({"main": main} if main else {})})
    sandbox = spec.decode(text, "json")
    return fates.decide(sandbox.layer, spec.main_layer_name(sandbox))


def template(**options) -> dict:
    """The profile template's layer tree (bbld.profile), as a spec."""
    sandbox = profile.expand(profile.Profile(command=["true"], **options), "t",
                             {"HOME": "/home/t", "PATH": "/usr/bin"}, 1000, 1000)
    return msgspec.to_builtins(sandbox)["layer"]


TABLE = [
    # (what, root, main, expected fates)
    ("a lone layer without pid namespace: the command replaces its supervisor",
     L("one", ns=("user", "mount"), command=True), None, {"one": "replaced"}),
    ("a lone layer with a pid namespace: its supervisor is pid 1 and stays",
     L("one", command=True), None, {"one": "supervise"}),
    ("a lone layer with a terminal keeps its supervisor (it holds the pty)",
     L("one", ns=("user", "mount"), command={"argv": ["sh"], "tty": True}), None,
     {"one": "supervise"}),
    ("the spec's own command_replaces_supervisor",
     L("one", command=True, command_replaces_supervisor=True), None, {"one": "replaced"}),
    ("bubblewrap's --dev shape without --unshare-pid: the inner layer replaces its supervisor",
     L("bwrap", L("sandbox", ns=("user",), command=True), ns=("user", "mount")), None,
     {"bwrap": "supervise", "sandbox": "replaced"}),
    ("bubblewrap's --dev shape with --unshare-pid: the command shares layer 1's pid "
     "namespace, so layer 1 stays, and the inner layer replaces its supervisor",
     L("bwrap", L("sandbox", ns=("user",), command=True)), None,
     {"bwrap": "supervise", "sandbox": "replaced"}),
    ("the template: empty mount layers inline, pid layers with nothing to run retire, "
     "those without sub-layers just end with their layer (supervise)",
     template(), None,
     {"layer1": "retire", "layer2": "inline", "layer2a": "supervise",
      "layer2h": "inline", "layer3": "retire", "layer4": "supervise",
      "layer4a": "supervise"}),
    ("the template with masked paths: layer2 has mounts to make, so it steps aside",
     template(masks=profile.Masks(paths=["/etc/hostname"])), None,
     {"layer1": "retire", "layer2": "step-aside", "layer2a": "supervise",
      "layer2h": "inline", "layer3": "retire", "layer4": "supervise",
      "layer4a": "supervise"}),
    ("layer 1 without a pid namespace: nobody leaves, and the main layer has sub-layers",
     L("top", L("mid", L("leaf", ns=("mount",), command=True), ns=("mount",)),
       ns=("user", "mount")), None,
     {"top": "supervise", "mid": "supervise", "leaf": "replaced"}),
    ("a pid layer whose namespace a command shares stays; an empty mount layer between is "
     "inline",
     L("top", L("mid", L("leaf", ns=("mount",), command=True), ns=("mount",))), None,
     {"top": "supervise", "mid": "inline", "leaf": "supervise"}),
    ("a mount layer with something to mount steps aside",
     L("top", L("mid", L("leaf", command=True), ns=("mount",),
                fs=[{"op": "tmpfs", "dest": "/tmp"}])), None,
     {"top": "retire", "mid": "step-aside", "leaf": "supervise"}),
    ("a main command that replaces its supervisor keeps every other supervisor",
     L("top", L("leaf", command=True, command_replaces_supervisor=True)), None,
     {"top": "supervise", "leaf": "replaced"}),
    ("lock files keep a supervisor", L("top", L("leaf", command=True),
                                       lock_files=["/tmp"]), None,
     {"top": "supervise", "leaf": "supervise"}),
    ("a pid layer without sub-layers and nothing to run just ends (no init to retire to)",
     L("top", L("empty"), L("leaf", command=True)), "leaf",
     {"top": "retire", "empty": "supervise", "leaf": "supervise"}),
    ("an empty mount layer that waits for a socket is not inline",
     L("top", L("gate", L("leaf", command=True), ns=("mount",),
                start_after=["/tmp/x.sock"])), None,
     {"top": "retire", "gate": "step-aside", "leaf": "supervise"}),
    ("an empty mount layer that denies user namespaces is not inline",
     L("top", L("deny", L("leaf", command=True), ns=("user", "mount"),
                user_namespaces="deny")), None,
     {"top": "retire", "deny": "step-aside", "leaf": "supervise"}),
]


@pytest.mark.parametrize("what, root, main, expected", TABLE, ids=[row[0] for row in TABLE])
def test_each_layers_fate(what, root, main, expected):
    assert decided(root, main) == expected


def test_every_fate_is_in_the_table():
    assert {fate for *_, expected in TABLE for fate in expected.values()} == \
        {"supervise", "step-aside", "inline", "retire", "replaced"}

