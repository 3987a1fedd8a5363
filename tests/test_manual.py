"""--help for every command, and the man pages and completion made from the same texts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bblctl.__main__ import HELP
from bblctl.manual import write_all

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [name for name, _, _ in HELP if name != "run"])
def test_every_command_has_help_and_starts_no_daemon(command, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    for flag in ("--help", "-h"):
        said = subprocess.run([sys.executable, "-m", "bblctl", command, flag], env=env,
                              capture_output=True, text=True, timeout=60)
        assert (said.returncode, said.stderr) == (0, ""), said
        assert said.stdout.startswith(f"usage: bblctl {command}")
    assert not (runtime / "bbl" / "bbld.sock").exists()  # (send-args took it as an id once)


def test_an_unknown_option_names_the_commands_help(tmp_path):
    said = subprocess.run([sys.executable, "-m", "bblctl", "tree", "--wide"],
                          capture_output=True, text=True, timeout=60)
    assert (said.returncode, said.stderr) == (
        2, "bblctl tree: unknown option --wide; see bblctl tree --help\n")


def test_the_man_pages_and_completion_are_made_from_the_help(tmp_path):
    """docs/man and docs/completions are what bblctl.manual makes now: run
    `python -m bblctl.manual docs` after changing a command's help or the profile docs."""
    made = write_all(str(tmp_path), str(ROOT / "docs" / "profiles.md"))
    for name in made:
        assert (tmp_path / name).read_text() == (ROOT / "docs" / name).read_text(), name
    assert "\\fBstart PROFILE" in (tmp_path / "man" / "bblctl.1").read_text()
    assert "\\fBlimits\\fR" in (tmp_path / "man" / "bbl-profile.5").read_text()


def test_bash_completes_commands_and_options():
    script = ROOT / "docs" / "completions" / "bblctl.bash"
    complete = ('source "$0"; COMP_WORDS=("${@:1}"); COMP_CWORD=$(($# - 1)); _bblctl; '
                'echo "${COMPREPLY[@]}"')
    first = subprocess.run(["bash", "-c", complete, script, "bblctl", "st"],
                           capture_output=True, text=True, timeout=30)
    assert first.stdout.split() == ["start", "stop"], first
    options = subprocess.run(["bash", "-c", complete, script, "bblctl", "stop", "x", "--"],
                             capture_output=True, text=True, timeout=30)
    assert options.stdout.split() == ["--help", "--timeout"], options


@pytest.mark.skipif(not shutil.which("fish"), reason="needs fish (.ci/run installs it)")
def test_fish_completes_commands_and_options():
    script = ROOT / "docs" / "completions" / "bblctl.fish"
    said = subprocess.run(["fish", "-c", f"source {script}; complete -C 'bblctl ki'; "
                           "complete -C 'bblctl stop --'"], capture_output=True, text=True,
                          timeout=30)
    assert said.stdout.splitlines() == [
        "kill\tsend a signal to the main command", "--help", "--timeout"], said


@pytest.mark.skipif(not shutil.which("zsh"), reason="needs zsh (.ci/run installs it)")
def test_zsh_reads_its_completion():
    script = ROOT / "docs" / "completions" / "_bblctl"
    said = subprocess.run(["zsh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert (said.returncode, said.stderr) == (0, "")
    assert "'stop:SIGTERM to the main command'" in script.read_text()
