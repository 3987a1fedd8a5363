"""The engine: turns a sandbox spec into real nested namespaces and processes.

Plain synchronous code, run in forked processes (never inside an event loop). Use it as:

    from bbld.engine import load, run
    status = run(load("sandbox.toml"), args=["--verbose"])

or from the command line: `python -m bbld.engine SPEC [-- ARGS...]`.
"""

from bbld.engine.errors import StartError
from bbld.engine.instance import Instance
from bbld.engine.plan import Plan, prepare

__all__ = ["Instance", "Plan", "StartError", "load", "prepare", "run"]


def load(path: str):
    """Read a spec file (.json or .toml; '-' reads JSON from stdin) into a Sandbox."""
    import sys

    from bbld import spec

    if path == "-":
        return spec.decode(sys.stdin.buffer.read(), "json", "<stdin>")
    fmt = "toml" if path.endswith(".toml") else "json"
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise spec.SpecError([f"{path}: cannot read: {exc.strerror}"]) from None
    return spec.decode(text, fmt, path)


def run(sandbox, args=(), info_fd=None) -> int:
    """Run a sandbox in the foreground; returns the main command's exit status."""
    from bbld.engine.instance import run as run_plan

    return run_plan(prepare(sandbox, list(args)), info_fd)
