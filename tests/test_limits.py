"""The profile's limits, as words and as the cgroup files they become (no cgroup needed)."""

import os

import pytest

from bbld import limits, profile, spec
from bbld.engine import cgroups


def layer_with(**resources) -> spec.Layer:
    pids = resources.pop("pids", None)
    return spec.Layer(name="l", pids_limit=pids,
                      resources=spec.Resources(**resources) if resources else None)


@pytest.mark.parametrize("words, files", [
    ({"pids": 30}, {"pids.max": "30"}),
    ({"memory": "2G"}, {"memory.max": "2147483648", "memory.swap.max": "2147483648"}),
    ({"memory": "512M", "swap": 0, "memory_high": "384MiB"},
     {"memory.max": "536870912", "memory.high": "402653184", "memory.swap.max": "0"}),
    ({"cpu": 0.5}, {"cpu.max": "50000 100000"}),
    ({"cpu": "200%"}, {"cpu.max": "200000 100000"}),
    ({"io_weight": 300}, {"io.weight": "default 300"}),
    ({"nproc": 100}, {}),  # (an rlimit: the app's layers, not a cgroup)
])
def test_each_limit_becomes_its_cgroup_file(words, files):
    parsed = limits.of(words)
    layer = spec.Layer(name="layer3", pids_limit=parsed.pids, resources=parsed.resources)
    assert cgroups.settings(layer) == files
    assert cgroups.controllers(files) == sorted({name.split(".")[0] for name in files})


@pytest.mark.parametrize("text, problem", [
    ('limits = { memory = "lots" }\n', "limits.memory: 'lots' must be a size"),
    ('limits = { cpu = 0 }\n', "limits.cpu: 0 must be CPUs (0.5, at least 0.01) or a"),
    ('limits = { cpu = "fast" }\n', "limits.cpu: 'fast' must be CPUs"),
    ('limits = { memory = 100 }\n', "limits.memory: 100 is less than a page: at least \"4K\""),
    ('limits = { io_weight = 0 }\n', "limits.io_weight: must be a whole number from 1 to 10000"),
    ('limits = { pids = 0 }\n', "limits.pids: must be a whole number >= 1"),
    ('limits = { required = 1 }\n', "limits.required: must be true or false"),
    ('limits = { gpu = 1 }\n', "limits: unknown limit 'gpu'; known: pids, memory"),
])
def test_bad_limits_are_refused_with_file_and_line(tmp_path, text, problem):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(str(path), {"HOME": "/home/u", "PATH": os.defpath})
    assert caught.value.problems[0].startswith(f"{path}:1: {problem}"), caught.value.problems


def test_every_bad_limit_is_reported_at_once(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[limits]\nmemory = "x"\ncpu = -1\nio_weight = 99999\n')
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(str(path), {"HOME": "/home/u", "PATH": os.defpath})
    assert [p.split(": ")[0] for p in caught.value.problems] == [
        f"{path}:2", f"{path}:3", f"{path}:4"]


def test_the_untrusted_zone_carries_the_cgroup_limits_and_the_app_layers_the_rlimits(
        tmp_path, monkeypatch):
    monkeypatch.setenv("BBL_CGROUP", str(tmp_path))  # (checked for its controllers:)
    monkeypatch.setattr(limits.cgroupfs, "controllers", lambda base: ["pids", "memory", "cpu"])
    path = tmp_path / "p.toml"
    path.write_text('limits = { memory = "1G", cpu = 1.5, pids = 99, nproc = 50 }\n')
    sandbox = profile.load(str(path), {"HOME": "/home/u", "PATH": os.defpath})
    layer3 = spec.path_to(sandbox.layer, "layer3")[-1]
    assert layer3.pids_limit == 99 and layer3.resources == spec.Resources(memory=1 << 30,
                                                                          cpu=1.5)
    assert spec.path_to(sandbox.layer, "layer4")[-1].rlimits == {"nproc": 50}


def test_a_spec_checks_its_resources():
    problems = []
    spec._check_resources(spec.Resources(memory=10, cpu=0.001, io_weight=0),
                          lambda where, what: problems.append(f"{where}: {what}"))
    assert problems == ["resources.memory: must be at least 4096 bytes",
                        "resources.cpu: must be between 0.01 and 4096 CPUs",
                        "resources.io_weight: must be between 1 and 10000"]


def test_an_oom_kill_in_a_limited_layer_is_the_instances_cause(tmp_path):
    """(memory.events as the kernel writes it; the real one where the memory controller is
    delegated: tests/security/test_cgroup_limits.py)"""
    quiet, killed = tmp_path / "a", tmp_path / "b"
    quiet.mkdir()
    killed.mkdir()
    (quiet / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    (killed / "memory.events").write_text("low 0\nhigh 3\nmax 9\noom 2\noom_kill 2\n")
    assert cgroups.cause_of([str(quiet)]) is None
    assert cgroups.cause_of([str(quiet), str(killed), str(tmp_path / "none")]) == \
        "out of memory: limits.memory reached, 2 processes killed"
