"""The profile's `limits`: rlimits of the app's layers, and limits of the whole untrusted
zone (layer3 and below) that a cgroup of its own enforces: `pids`, `memory`, `memory_high`,
`swap`, `cpu`, `io_weight` (docs/profiles.md, "Resource limits"). `required = false` lets
a start go on without the cgroup limits the host cannot give, with a notice.

Pure words, but for `missing`, which asks the delegated cgroup (bbld.cgroupfs) which
controllers it has. No trio, no engine.
"""

from __future__ import annotations

import re

from msgspec import Struct

from bbld import cgroupfs, spec

SIZES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
CGROUP_KEYS = {"pids": "pids", "memory": "memory", "memory_high": "memory", "swap": "memory",
               "cpu": "cpu", "io_weight": "io"}  # key: the controller it needs
# rlimits by the profile's names: the spec's, but RLIMIT_CPU (seconds of CPU time) is
# "cpu_time", as "cpu" is the share of the cgroup's cpu.max
RLIMITS = {("cpu_time" if name == "cpu" else name): name for name in spec.RLIMITS}
# Processes (threads count too) each of the app's layers may hold unless the profile says
# otherwise ("unlimited" lifts it): a fork bomb stops there, with the host's user limit far
# away. Browsers run a few hundred threads; a build inside may want more.
DEFAULT_NPROC = 4096
UNLIMITED = "unlimited"  # an rlimit's word for "the caller's own limit, as without BBL"


class Limits(Struct, kw_only=True):
    rlimits: dict[str, int] = {}  # of the app's layers (layer4, 4a, 4x)
    pids: int | None = None  # layer3's pids_limit
    resources: spec.Resources | None = None  # layer3's
    required: bool = True  # False: go on without cgroup limits the host cannot give


def problems(words: dict) -> list[tuple[str, str]]:
    """(where, what is wrong) for every word."""
    found = []
    for name, value in words.items():
        where = f"$.limits.{name}"
        if name == "required":
            if not isinstance(value, bool):
                found.append((where, "must be true or false"))
        elif isinstance(value, bool):
            found.append((where, "must be a number"))
        elif name in ("memory", "memory_high", "swap"):
            if size(value) is None:
                found.append((where, f"{value!r} must be a size: bytes, or \"512M\", \"2G\""))
            elif name != "swap" and size(value) < 4096:
                found.append((where, f"{value!r} is less than a page: at least \"4K\""))
        elif name == "cpu":
            if cpus(value) is None or not 0.01 <= cpus(value) <= 4096:
                found.append((where, f"{value!r} must be CPUs (0.5, at least 0.01) or a "
                              "percentage (\"50%\")"))
        elif name == "io_weight":
            if not isinstance(value, int) or not 1 <= value <= 10000:
                found.append((where, "must be a whole number from 1 to 10000 (default 100)"))
        elif name in RLIMITS and value == UNLIMITED:
            pass
        elif name == "pids" or name in RLIMITS:
            least = 1 if name == "pids" else 0
            if not isinstance(value, int) or value < least:
                found.append((where, f"must be a whole number >= {least}" +
                              (f", or \"{UNLIMITED}\"" if name in RLIMITS else "")))
        else:
            found.append(("$.limits", f"unknown limit {name!r}; known: "
                          f"{', '.join([*CGROUP_KEYS, 'required', *RLIMITS])}"))
    return found


def size(value) -> int | None:
    """Bytes: an int, or "512M", "2G", "1.5GiB" (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    match = SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    return int(float(match.group(1)) * SIZES[match.group(2).lower()]) if match else None


def cpus(value) -> float | None:
    """CPUs' worth of time: a number (0.5), or a percentage of one CPU ("200%")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", value.strip()) if isinstance(value, str) \
        else None
    return float(match.group(1)) / 100 if match else None


def of(words: dict) -> Limits:
    """The words, checked by `problems`, as the template uses them."""
    cgroup = {name: value for name, value in words.items() if name in CGROUP_KEYS}
    resources = None
    if any(name != "pids" for name in cgroup):
        resources = spec.Resources(
            memory=_maybe(size, cgroup.get("memory")),
            memory_high=_maybe(size, cgroup.get("memory_high")),
            swap=_maybe(size, cgroup.get("swap")), cpu=_maybe(cpus, cgroup.get("cpu")),
            io_weight=cgroup.get("io_weight"))
    rlimits = {RLIMITS[n]: v for n, v in {"nproc": DEFAULT_NPROC, **words}.items()
               if n in RLIMITS and v != UNLIMITED}
    return Limits(rlimits=rlimits,
                  pids=cgroup.get("pids"), resources=resources,
                  required=words.get("required", True))


def _maybe(convert, value):
    return None if value is None else convert(value)


def missing(words: dict, environ=None) -> tuple[list[str], str]:
    """The keys whose controller the delegated cgroup lacks, and one line saying so."""
    wanted = {name: controller for name, controller in CGROUP_KEYS.items() if name in words}
    if not wanted:
        return [], ""
    base = cgroupfs.base(environ)
    if base is None:
        return sorted(wanted), (f"{_need(sorted(wanted))} a delegated cgroup, and bbld has "
                                f"none: {cgroupfs.FIX}")
    have = cgroupfs.controllers(base)
    lacking = sorted(name for name, controller in wanted.items() if controller not in have)
    controllers = sorted({wanted[name] for name in lacking})
    return lacking, (f"{_need(lacking)} the {' and '.join(controllers)} "
                     f"controller{'s' if len(controllers) > 1 else ''}, which the delegated "
                     f"cgroup {base} lacks (it has: {' '.join(have) or 'none'}): "
                     f"{cgroupfs.FIX}") if lacking else ""


def _need(keys: list[str]) -> str:
    return f"{', '.join(keys)} need{'s' if len(keys) == 1 else ''}"
