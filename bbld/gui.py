"""The profile's `gui`: a mode name, or a `[gui]` table with `mode` and the options (TOML
cannot give one key both a string and a table); docs/profiles.md, "Graphical apps".

- `host-x11`: the host's display, with a copy of the user's cookie (bbld.profile._desktop);
- `host-x11-untrusted`: the host's display, with a cookie it made untrusted (X SECURITY);
- `xephyr`: a display of the app's own, a nested X server (Xephyr) in a trusted helper
  layer shown as one window on the host's display, with a cookie of the instance's own;
- `wayland`: the compositor's socket alone.

Pure data but for what the host has and makes (`host_problem`, `untrusted_cookie`). No
trio, no engine.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
from typing import Literal

import msgspec
from msgspec import Struct

from bbld import dbus, spec

Mode = Literal["none", "host-x11", "host-x11-untrusted", "xephyr", "wayland"]
UNTRUSTED_TIMEOUT = 3600  # s an untrusted cookie outlives the app's last X connection
NESTED = "Xephyr"
SOCKETS = "/tmp/.X11-unix"  # where X clients look for display N's socket (XN)
AUTHORITY = "/run/bbl/Xauthority"  # the app's XAUTHORITY
FAMILY_WILD = 0xFFFF  # an Xauthority entry for any host: the sandbox has its own hostname


class Gui(Struct, forbid_unknown_fields=True, kw_only=True):
    mode: Mode = "xephyr"
    size: str = "1280x800"  # of the nested display (and its window)
    resizable: bool = True  # the nested display follows its window's size
    title: str | None = None  # of its window; default "[bbl:NAME] NAME"
    # a window manager or a whole desktop session, run beside the app (layer4a): the
    # "isolated desktop"
    session: list[str] = []


def of(value: str | Gui) -> Gui:
    return Gui(mode=value) if isinstance(value, str) else value


def problems(value: Gui, net_mode: str) -> list[tuple[str, str]]:
    """(where, what is wrong) for the words, without looking at the host."""
    found = []
    if value.mode == "host-x11-untrusted" and net_mode == "host":
        found.append(("$.gui", "\"host-x11-untrusted\" with net = \"host\": the app could "
                      "reach the host's display through its abstract socket without the "
                      "untrusted cookie; use net = \"none\" or \"nat\""))
    default = Gui()
    options = [name for name in value.__struct_fields__
               if name != "mode" and getattr(value, name) != getattr(default, name)]
    if value.mode != "xephyr":
        return found + [(f"$.gui.{name}", f"needs mode = \"xephyr\" (mode {value.mode!r} has "
                         "no display of its own)") for name in options]
    if not re.fullmatch(r"[1-9]\d{1,4}x[1-9]\d{1,4}", value.size):
        found.append(("$.gui.size", f"{value.size!r} must be WIDTHxHEIGHT, e.g. \"1280x800\""))
    if value.session and not value.session[0]:
        found.append(("$.gui.session", "must name a program, e.g. [\"twm\"]"))
    if net_mode == "host":  # (the abstract socket lives in the network namespace)
        found.append(("$.gui", "\"xephyr\" with net = \"host\": the app could reach the host's "
                      "display through its abstract socket (@/tmp/.X11-unix/X0); use net = "
                      "\"none\" or \"nat\""))
    return found


def host_display(environ: dict[str, str]) -> int | None:
    """The display number $DISPLAY names (":0", ":0.0", "unix:0"), None if it names none."""
    match = re.fullmatch(r"(?:unix)?:(\d+)(?:\.\d+)?", environ.get("DISPLAY", ""))
    return int(match.group(1)) if match else None


def host_problem(value: Gui, environ: dict[str, str]) -> str | None:
    """What this host lacks for `value`, as one line with the fix; None if nothing."""
    if value.mode == "host-x11-untrusted":
        return _untrusted_problem(environ)
    if value.mode == "wayland":
        return _wayland_problem(environ)
    if value.mode != "xephyr":
        return None
    if shutil.which(NESTED, path=environ.get("PATH") or os.defpath) is None:
        return "xephyr needs Xephyr, which is not installed: apt install xserver-xephyr"
    number = host_display(environ)
    if number is None:
        return ("xephyr shows its window on the host's display, and DISPLAY names none "
                f"({environ.get('DISPLAY', 'unset')!r}): start it from the desktop session")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:  # (Xephyr reaches it there: its helper layer has a directory of its own there)
            probe.connect(f"\0{SOCKETS}/X{number}")
        except OSError as exc:
            return (f"xephyr reaches the host's display :{number} through its abstract socket "
                    f"@{SOCKETS}/X{number}, which does not answer ({exc.strerror})")
    return None


def _untrusted_problem(environ: dict[str, str]) -> str | None:
    if shutil.which("xauth", path=environ.get("PATH") or os.defpath) is None:
        return "host-x11-untrusted makes its cookie with xauth, which is not installed: " \
               "apt install xauth"
    number = host_display(environ)
    if number is None or not os.path.exists(f"{SOCKETS}/X{number}"):
        return ("host-x11-untrusted binds the host display's socket, and DISPLAY names none "
                f"({environ.get('DISPLAY', 'unset')!r}): start it from the desktop session")
    try:
        listed = subprocess.run(["xhost"], env=_x_environ(environ), capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None  # (no xhost: nothing to tell; xauth's own failure will say more)
    lines = listed.stdout.splitlines()
    # (a client without a cookie is let in by the server's own rules: the app would drop
    # the untrusted cookie and come in trusted through the same socket)
    if lines and "disabled" in lines[0]:
        return ("the host's display lets every client in (access control disabled: xhost +), "
                "so an untrusted cookie changes nothing: run `xhost -` or use gui = "
                "\"xephyr\"")
    opened = [line.strip() for line in lines[1:] if line.strip()]
    if opened:
        return (f"the host's display lets clients in without a cookie ({', '.join(opened)}), "
                "which the app would do instead of using its untrusted one: remove them "
                f"(xhost -{opened[0]}) or use gui = \"xephyr\"")
    return None


def wayland_socket(environ: dict[str, str]) -> str | None:
    """The compositor's socket, as its clients find it: $WAYLAND_DISPLAY, a path or a name
    in $XDG_RUNTIME_DIR (None when neither says)."""
    name = environ.get("WAYLAND_DISPLAY")
    if not name:
        return None
    if os.path.isabs(name):
        return name
    directory = environ.get("XDG_RUNTIME_DIR")
    return os.path.join(directory, name) if directory and os.path.isabs(directory) else None


def _wayland_problem(environ: dict[str, str]) -> str | None:
    path = wayland_socket(environ)
    if path is None:
        return ("wayland binds the compositor's socket, and WAYLAND_DISPLAY (with "
                "XDG_RUNTIME_DIR) names none: start it from a Wayland session")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            return f"wayland: the compositor's socket {path} does not answer ({exc.strerror})"
    return None


def untrusted_cookie(environ: dict[str, str]) -> bytes:
    """An Xauthority entry (wildcard family) with a cookie the host's display generated as
    *untrusted* for the X SECURITY extension: no XTEST, no XInput, no reading other
    clients' windows. DisplayError when the display cannot make one."""
    import tempfile

    number = host_display(environ)
    with tempfile.TemporaryDirectory(prefix="bbl-xauth-") as directory:
        path = os.path.join(directory, "cookie")
        try:
            made = subprocess.run(["xauth", "-q", "-f", path, "generate", f":{number}", ".",
                                   "untrusted", "timeout", str(UNTRUSTED_TIMEOUT)],
                                  env=_x_environ(environ), capture_output=True, text=True,
                                  timeout=10)
            with open(path, "rb") as f:
                data = f.read()
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DisplayError(f"host-x11-untrusted: xauth could not make a cookie ({exc})") \
                from None
    entries = xauthority_for(data, str(number))
    if made.returncode != 0 or not entries:
        said = (made.stderr.strip().splitlines() or ["no cookie"])[-1]
        raise DisplayError(f"host-x11-untrusted: the host's display :{number} made no "
                           f"untrusted cookie ({said}): it needs the SECURITY extension")
    return entries


class DisplayError(ValueError):
    """The host's display cannot give what the profile asks for (one line)."""


def _x_environ(environ: dict[str, str]) -> dict[str, str]:
    return {name: environ[name] for name in ("DISPLAY", "XAUTHORITY", "HOME", "PATH")
            if name in environ}


def xauthority_for(data: bytes, display: str) -> bytes:
    """The entries of an Xauthority file for display `display` only, rewritten to the
    wildcard family: the sandbox has a hostname of its own, so entries tied to the host's
    name would not match, and cookies of other displays stay out."""
    kept, offset = [], 0
    while offset < len(data):
        offset += 2  # the family: replaced
        fields = []
        for _ in range(4):  # address, display number, auth name, auth data
            length = int.from_bytes(data[offset:offset + 2], "big")
            fields.append(data[offset + 2:offset + 2 + length])
            offset += 2 + length
        if offset > len(data):
            return b""  # truncated: not an Xauthority file
        if fields[1].decode(errors="replace") == display:
            kept.append(xauthority_entry(display, fields[3], fields[2]))
    return b"".join(kept)


class Parts(Struct, kw_only=True):
    """What the template adds for a nested display: the helper layer Xephyr runs in,
    layer3's view and variables, the socket the app's layers wait for, and the session
    beside the app."""
    layer: spec.Layer | None = None  # layer2x, under layer2
    fs: list = []  # in layer3
    env: dict[str, str] = {}  # in layer3
    start_after: list[str] = []  # layer3's path of the display's socket
    session: list[str] | None = None  # in layer4a


def parts(value: Gui, name: str, environ: dict[str, str], uid: int, gid: int,
          helper_dir: str, system: list) -> Parts:
    """The template's parts for `value` (`name`: the instance's, for the window's title;
    `system`: the operations that show the system's directories read-only)."""
    if value.mode != "xephyr":
        return Parts()
    number = 1 if host_display(environ) != 1 else 2  # (not the host's: Xephyr is its client)
    authority = xauthority_entry(str(number), secrets.token_bytes(16))
    argv = [shutil.which(NESTED, path=environ.get("PATH") or os.defpath) or NESTED,
            f":{number}", "-auth", "/tmp/xephyr.auth", "-nolisten", "tcp", "-nolisten",
            "local", "-screen", value.size,
            "-title", value.title or f"[bbl:{name}] {name}"]
    if value.resizable:
        argv.append("-resizeable")
    host_authority = environ.get("XAUTHORITY") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".Xauthority")
    # Xephyr's own view: the system read-only, a private /tmp (its lock file) with the
    # helpers' directory (layer1's tmpfs) as its socket directory, so that neither lands on
    # the host; the host's display reached through its abstract socket (not listening on
    # one itself: "-nolisten local"), with the user's cookie
    fs = [*system, spec.Proc(dest="/proc"),
          *(spec.DevBind(src=f"/dev/{node}", dest=f"/dev/{node}")
            for node in ("null", "zero", "urandom")),
          spec.Tmpfs(dest="/tmp", mode=0o1777), spec.Bind(src=helper_dir, dest=SOCKETS),
          spec.RoBindData(dest="/tmp/xephyr.auth", data=authority, mode=0o400),
          spec.Tmpfs(dest="/var/lib/xkb", mode=0o755)]
    if os.path.isfile(host_authority):
        fs.append(spec.RoBind(src=host_authority, dest=host_authority))
    layer = spec.Layer(name="layer2x", namespaces=["user", "pid", "mount"], uid=uid, gid=gid,
                       new_root=True, fs=[msgspec.structs.replace(op, origin="gui")
                                          for op in fs],
                       env=spec.Env(set={"XAUTHORITY": host_authority}),
                       companions=[spec.Command(argv=argv, early=True)])
    return Parts(
        layer=layer,
        fs=[spec.Symlink(target_path=dbus.HELPERS, dest=SOCKETS, origin="gui"),
            spec.RoBindData(dest=AUTHORITY, data=authority, mode=0o400, origin="gui")],
        env={"DISPLAY": f":{number}", "XAUTHORITY": AUTHORITY},
        start_after=[f"{SOCKETS}/X{number}"],
        session=list(value.session) or None)


def xauthority_entry(display: str, cookie: bytes, kind: bytes = b"MIT-MAGIC-COOKIE-1") -> bytes:
    """One Xauthority entry: any host (FamilyWild), `display`, `kind` (MIT-MAGIC-COOKIE-1)."""
    fields = (b"", display.encode(), kind, cookie)
    return FAMILY_WILD.to_bytes(2, "big") + b"".join(
        len(f).to_bytes(2, "big") + f for f in fields)
