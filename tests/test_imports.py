"""The house by process role: which code may import what, read from the source (every import,
also those inside functions). bbld's own process is trio and never touches the kernel work;
the forker and monitors are synchronous and drive the engine; the engine imports neither;
the client stays light (tests/test_client.py checks what its commands load at start)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("spec", "bwrap", "profile", "dbus", "gui", "wayland", "net", "limits", "cgroupfs",
          "paths", "peer", "text", "protocol", "channel", "messages", "console", "__init__")
RULES = {  # package (or module) -> what it may not import
    "bbld/daemon": ("bbld.engine", "bbld.monitors", "bblctl"),
    "bbld/monitors": ("trio", "bbld.daemon", "bblctl"),
    "bbld/engine": ("trio", "bbld.daemon", "bbld.monitors", "bblctl"),
    **{f"bbld/{name}.py": ("trio", "bbld.engine", "bbld.daemon", "bbld.monitors", "bblctl")
       for name in SHARED},
    "bblctl": ("trio", "bbld.engine", "bbld.daemon", "bbld.monitors", "msgspec"),
}
# The exceptions, each for a reason: bubblewrap inside a sandbox nests (the engine runs in
# the client's process), and the slower paths of the client that parse command lines,
# profiles or specs themselves (no daemon yet, --single-instance, profile show/validate).
ALLOWED = {("bblctl/run.py", "bbld.engine.standalone"), ("bblctl/run.py", "msgspec"),
           ("bblctl/profiles.py", "msgspec"),
           # (the man pages' maker, run when the docs are made, never by a command: bbld's
           # own usage text is its source)
           ("bblctl/manual.py", "bbld.daemon.main"), ("bblctl/manual.py", "bbld.daemon.main.USAGE")}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def files(where: str) -> list[Path]:
    path = ROOT / where
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("where", sorted(RULES))
def test_each_process_role_imports_only_what_it_may(where):
    broken = []
    for path in files(where):
        relative = str(path.relative_to(ROOT))
        for name in imports_of(path):
            for banned in RULES[where]:
                if _under(name, banned) and not any(
                        file == relative and _under(name, allowed) for file, allowed in ALLOWED):
                    broken.append(f"{relative} imports {name}")
    assert broken == []


def test_every_module_is_under_a_rule():
    ruled = {path for where in RULES for path in files(where)}
    assert sorted(str(p.relative_to(ROOT)) for p in
                  [*(ROOT / "bbld").rglob("*.py"), *(ROOT / "bblctl").rglob("*.py")]
                  if p not in ruled) == []
