"""The lint step, part of the suite (so CI runs it): ruff with the rules pyproject.toml
names, and flake8-async on bbld's trio code (ruff lacks some of its rules, ASYNC119: a yield
inside a context manager of an async generator)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(sys.executable).parent


def tool(name: str) -> str:
    path = TOOLS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (the test extras have it)")
    return found


def test_ruff_finds_nothing():
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "bbld", "bblctl", "tests"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_flake8_async_finds_nothing_in_the_trio_code():
    files = sorted(str(path) for path in (ROOT / "bbld" / "daemon").glob("*.py"))
    result = subprocess.run([tool("flake8-async"), *files], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr
