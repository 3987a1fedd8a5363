"""`bblctl setup [--remove]`: make this install of BBL ready to use, as the user, never root.

- `bblctl`, `bbl-bwrap` and `bbld` linked into `~/.local/bin` (Debian's `~/.profile` puts it
  on PATH in every login shell once it exists);
- the systemd user units rendered from `systemd/` with this install's paths (`ExecStart=`,
  `Documentation=`) into `$XDG_CONFIG_HOME/systemd/user/`, and `bbld.socket` enabled and
  started where a user manager runs (otherwise bblctl starts bbld on demand).

Idempotent: what is already so is said so. It never replaces a file it did not write (its
units carry MARK; its links point into this install), and `--remove` undoes only its own.
"""

import os
import shutil
import subprocess
import sys

from bblctl.cli import UsageError, parse
from bblctl.client import running_daemon
from bbld import paths

SCRIPTS = ("bblctl", "bbl-bwrap", "bbld")
# the man pages and the shell completion (made by bblctl.manual), linked where man (for
# ~/.local/bin on PATH) and bash-completion look: relative to ~/.local/share
MANUALS = {"man/bblctl.1": "man/man1/bblctl.1", "man/bbld.1": "man/man1/bbld.1",
           "man/bbl-bwrap.1": "man/man1/bbl-bwrap.1",
           "man/bbl-profile.5": "man/man5/bbl-profile.5",
           "completions/bblctl.bash": "bash-completion/completions/bblctl",
           "completions/bblctl.fish": "fish/vendor_completions.d/bblctl.fish",
           "completions/_bblctl": "zsh/site-functions/_bblctl"}
UNITS = ("bbld.socket", "bbld.service")
MARK = "# Written by `bblctl setup`; `bblctl setup --remove` removes it.\n"


def setup(argv: list[str]) -> int:
    flags, _, positional = parse(argv, {"--remove": False}, {})
    if positional:
        raise UsageError(f"setup takes no arguments (got {positional[0]!r})")
    bindir = os.path.join(sys.prefix, "bin")  # this install's scripts
    if not os.access(os.path.join(bindir, "bbld"), os.X_OK):
        raise UsageError(f"{bindir}/bbld is missing: run setup with the bblctl of an "
                         "installed BBL (pip install .)")
    return remove(bindir) if flags["--remove"] else install(bindir)


def render(text: str, bindir: str, docs: str, systemd: int) -> str:
    """A unit template with this install's paths, for this systemd."""
    subgroup = "DelegateSubgroup=daemon" if systemd >= 254 else \
        f"# (no DelegateSubgroup=: systemd {systemd or 'unknown'})"
    return text.replace("@bindir@", bindir).replace("@docdir@", docs).replace(
        "@delegate_subgroup@", subgroup)


def _systemd_version() -> int:
    try:
        said = subprocess.run(["systemctl", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.split()
        return int(said[1]) if len(said) > 1 and said[1].isdigit() else 0
    except (OSError, subprocess.TimeoutExpired):
        return 0


def install(bindir: str) -> int:
    links = os.path.join(paths.home(), ".local", "bin")
    os.makedirs(links, exist_ok=True)
    for name in SCRIPTS:
        _link(os.path.join(links, name), os.path.join(bindir, name))
    for source, link in _manuals():
        os.makedirs(os.path.dirname(link), exist_ok=True)
        _link(link, source)
    if links not in os.environ.get("PATH", "").split(os.pathsep):
        _say(f"{links} is not on this shell's PATH: a new login shell has it (Debian's "
             "~/.profile adds it once it exists); or add it to PATH yourself")
    units = _unit_directory()
    os.makedirs(units, exist_ok=True)
    templates, docs = _shared("systemd"), _shared("docs")
    for name in UNITS:
        with open(os.path.join(templates, name)) as f:
            text = render(f.read(), bindir, docs, _systemd_version())
        _write_unit(os.path.join(units, name), MARK + text)
    if not _user_manager():
        _say("no systemd user manager runs here: bblctl starts bbld when it is needed")
        return 0
    conn = running_daemon()
    if conn is not None:  # (an autostarted one holds the socket the unit is to listen on)
        with conn:
            started_by = conn.call("io.bbl.Manager.Status")["started_by"]
            if started_by != "socket activation":
                conn.call("io.bbl.Manager.Quit")
                _say("stopped the running bbld (its instances run on; the socket-activated "
                     "one adopts them)")
    _systemctl("daemon-reload")
    _systemctl("enable", "--now", "bbld.socket")
    _say("enabled bbld.socket: systemd starts bbld on the first connection")
    return 0


def remove(bindir: str) -> int:
    if _user_manager():
        _systemctl("disable", "--now", "bbld.socket", "bbld.service")
        _say("disabled bbld.socket and stopped bbld (its instances run on)")
    units = _unit_directory()
    for name in UNITS:
        path = os.path.join(units, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            ours = f.read().startswith(MARK)
        if ours:
            os.unlink(path)
            _say(f"removed {path}")
        else:
            _say(f"{path} was not written by bblctl setup: left alone")
    if _user_manager():
        _systemctl("daemon-reload")
    links = [(os.path.join(bindir, name), os.path.join(paths.home(), ".local", "bin", name))
             for name in SCRIPTS]
    for target, link in [*links, *_manuals()]:
        if os.path.islink(link) and os.readlink(link) == target:
            os.unlink(link)
            _say(f"removed {link}")
    return 0


def _manuals() -> list[tuple[str, str]]:
    """(this install's file, the link to it under ~/.local/share) for each manual."""
    share = os.path.join(paths.home(), ".local", "share")
    return [(os.path.join(_shared("docs"), source), os.path.join(share, link))
            for source, link in MANUALS.items()]


def _link(link: str, target: str) -> None:
    if os.path.islink(link) and os.readlink(link) == target:
        return _say(f"{link} -> {target} (already)")
    if os.path.lexists(link):
        return _say(f"{link} exists and is not a link to this install: left alone")
    os.symlink(target, link)
    _say(f"linked {link} -> {target}")


def _write_unit(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return _say(f"{path} (already)")
        if not old.startswith(MARK):
            return _say(f"{path} was not written by bblctl setup: left alone")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    _say(f"installed {path}")


def _shared(kind: str) -> str:
    """Where this install keeps its docs or unit templates: under its prefix (a plain
    install, pyproject's data-files), or in the source tree (an editable one)."""
    installed = os.path.join(sys.prefix, "share", *(("doc", "bbl") if kind == "docs" else
                                                    ("bbl", "systemd")))
    source = os.path.join(os.path.dirname(os.path.dirname(paths.__file__)), kind)
    return installed if os.path.isdir(installed) else source


def _unit_directory() -> str:
    config = os.environ.get("XDG_CONFIG_HOME")
    if not (config and os.path.isabs(config)):
        config = os.path.join(paths.home(), ".config")
    return os.path.join(config, "systemd", "user")


def _user_manager() -> bool:
    """Whether a systemd user manager runs for us (its private socket exists)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return shutil.which("systemctl") is not None and \
        os.path.exists(os.path.join(runtime, "systemd", "private"))


def _systemctl(*argv: str) -> None:
    result = subprocess.run(["systemctl", "--user", *argv], capture_output=True, text=True,
                            timeout=60)
    if result.returncode:
        raise UsageError(f"systemctl --user {' '.join(argv)} failed: "
                         f"{result.stderr.strip() or result.returncode}")


def _say(line: str) -> None:
    print(line, flush=True)
