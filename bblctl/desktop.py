"""`bblctl desktop install PROFILE [--from APP.desktop]`: a launcher that starts the app in its
sandbox.

With --from, the launcher takes the original entry's file name (so it shadows that id in the
user's menu and in "open with"), its names, icon, categories, MIME types and StartupWMClass;
everything that would start the app outside the sandbox (Exec, TryExec, D-Bus activation,
the entry's extra actions) is replaced or dropped.
"""

import os
import shutil
import sys

from bblctl.cli import UsageError, parse
from bbld import profile

# Keys of the original entry worth keeping; anything else (Exec, TryExec, Actions, X-...)
# could run the app unsandboxed, so it goes.
KEPT = ("Name", "GenericName", "Comment", "Icon", "Categories", "MimeType", "Keywords",
        "StartupWMClass", "StartupNotify", "Terminal", "NoDisplay")


def desktop(argv: list[str]) -> int:
    if not argv or argv[0] != "install":
        raise UsageError("use `bblctl desktop install PROFILE [--from APP.desktop]`")
    _, values, positional = parse(argv[1:], {}, {"--from": None})
    if len(positional) != 1:
        raise UsageError("desktop install takes one profile name")
    name = positional[0]
    if _has_control(name):  # a newline would start a line of its own
        raise UsageError(f"{name!r}: a profile name or path with control characters cannot "
                         "go into a launcher; rename it")
    if "/" in name or name.endswith(".toml"):
        name = os.path.abspath(name)  # the launcher runs elsewhere
    try:
        sandbox = profile.load(profile.find(name))
    except profile.ProfileError as exc:
        raise UsageError("\n".join(exc.problems)) from None
    original = _read_entry(values["--from"]) if values["--from"] else {}
    filename = os.path.basename(values["--from"]) if values["--from"] else \
        f"bbl-{_file_name(name)}.desktop"
    directory = os.path.join(_data_home(), "applications")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    with open(path + ".tmp", "w") as f:
        f.write(entry(name, sandbox.name, original))
    os.replace(path + ".tmp", path)
    print(path)
    return 0


def entry(profile_name: str, instance_name: str, original: dict[str, str]) -> str:
    """The launcher's text."""
    keys = {key: value for key, value in original.items() if key.partition("[")[0] in KEPT}
    keys.setdefault("Name", f"{instance_name} (sandboxed)")
    lines = ["[Desktop Entry]", "Type=Application"]
    lines += [f"{key}={value}" for key, value in keys.items()]
    lines += [f"Exec={_exec_line(profile_name)}", "DBusActivatable=false",
              f"X-BBL-Profile={profile_name.replace(chr(92), chr(92) * 2)}"]  # \\ escaped
    if any(_has_control(line) for line in lines):  # (a line break would start a new key)
        raise UsageError("a launcher's values may not hold control characters")
    return "\n".join(lines) + "\n"


def _exec_line(profile_name: str) -> str:
    """`bblctl start NAME -- %U`, quoted as the Desktop Entry spec wants."""
    bblctl = shutil.which("bblctl") or os.path.abspath(sys.argv[0])
    argv = [bblctl, "start", profile_name, "--"]
    return " ".join(_quote(arg) for arg in argv) + " %U"


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _file_name(profile_ref: str) -> str:
    """The launcher's file name part for a profile name or file: letters, digits, . _ -."""
    stem = os.path.basename(profile_ref).removesuffix(".toml")
    return "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in stem)


def _quote(arg: str) -> str:
    if arg and not any(c in arg for c in ' \t\n"\'\\><~|&;$*?#()`%='):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace(
        "$", "\\$").replace("%", "%%")
    return f'"{escaped}"'


def _read_entry(path: str) -> dict[str, str]:
    """The [Desktop Entry] group of a .desktop file (keys in order)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--from {path}: cannot read it: "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    keys, group = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1]
        elif group == "Desktop Entry" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    if not keys:
        raise UsageError(f"--from {path}: no [Desktop Entry] group in it")
    return keys


def _data_home() -> str:
    base = os.environ.get("XDG_DATA_HOME")
    if base and os.path.isabs(base):
        return base
    return os.path.join(os.path.expanduser("~"), ".local", "share")
