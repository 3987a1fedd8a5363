"""What layers may say while an instance starts (bbld.engine.reports.StartRules): a pure state
machine, fed reports as a hostile or buggy layer might send them."""

import pytest

from bbld.engine.reports import Built, Failed, MainEnded, Running, StartRules

B = Built(layer="top", namespaces={"mnt": 1}, namespace_fds=["mnt"])
B_INLINE = Built(layer="mid", namespaces={"mnt": 2}, namespace_fds=["mnt"], process=False)
B_LEAF = Built(layer="leaf", namespaces={"pid": 3}, namespace_fds=["pid"])

SEQUENCES = [
    # (what, [(report, fds)], the verdict of the last one: None = accepted)
    ("a layer's Built with its pidfd and its namespace fd", [(B, 2)], None),
    ("a layer built by its parent's process has no pidfd", [(B_INLINE, 1)], None),
    ("Built without the pidfd", [(B, 1)], "unexpected report Built"),
    ("Built with an fd too many", [(B, 3)], "unexpected report Built"),
    ("Built twice", [(B, 2), (B, 2)], "unexpected report Built"),
    ("a namespace named twice",
     [(Built(layer="top", namespaces={"mnt": 1}, namespace_fds=["mnt", "mnt"]), 3)],
     "unexpected report Built"),
    ("Running after Built, with the main command's pidfd and pty",
     [(B_LEAF, 2), (Running(layer="leaf"), 2)], None),
    ("Running before Built", [(Running(layer="leaf"), 0)], "unexpected report Running"),
    ("Running with three fds", [(B, 2), (Running(layer="top"), 3)],
     "unexpected report Running"),
    ("MainEnded from the main command's layer", [(MainEnded(layer="leaf", status=3), 0)],
     None),
    ("MainEnded from another layer", [(MainEnded(layer="top", status=0), 0)],
     "unexpected report MainEnded"),
    ("MainEnded with an fd", [(MainEnded(layer="leaf", status=0), 1)],
     "unexpected report MainEnded"),
    ("a report about a layer that does not exist", [(Running(layer="ghost"), 0)],
     "report about an unknown layer 'ghost'"),
    ("Failed is said, and the start fails with its words (the caller does)",
     [(Failed(layer="mid", message="no"), 0)], None),
]


@pytest.mark.parametrize("what, sequence, verdict", SEQUENCES,
                         ids=[row[0] for row in SEQUENCES])
def test_the_rules(what, sequence, verdict):
    rules = StartRules(["top", "mid", "leaf"], main="leaf")
    for report, fds in sequence[:-1]:
        assert rules.judge(report, fds) is None
    assert rules.judge(*sequence[-1]) == verdict


def test_the_start_barrier_sees_what_was_accepted():
    rules = StartRules(["top", "leaf"], main="leaf")
    rules.judge(B, 2)
    rules.judge(B_LEAF, 2)
    rules.judge(Running(layer="leaf"), 0)
    rules.judge(Running(layer="top"), 9)  # refused: not counted
    assert (rules.built, rules.running) == ({"top", "leaf"}, {"leaf"})
