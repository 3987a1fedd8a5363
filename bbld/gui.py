"""The profile's `gui`: a mode name, or a `[gui]` table with `mode` and the options (TOML
cannot give one key both a string and a table); docs/profiles.md, "Graphical apps".

- `host-x11`: the host's display, with a copy of the user's cookie (bbld.profile._desktop);
- `host-x11-untrusted`: the host's display, with a cookie it made untrusted (X SECURITY);
- `xephyr`: a display of the app's own, a nested X server (Xephyr) in a trusted helper
  layer shown as one window on the host's display, with a cookie of the instance's own;
- `xpra`: a display of the app's own on the untrusted side (an xpra server and its Xvfb,
  beside the app), its windows shown one by one on the host's display by an xpra client in
  a trusted helper layer, through a unix socket the two layers share;
- `wayland`: one Wayland socket: the instance's own, registered as the sandbox's where the
  compositor offers security contexts (bbld.wayland), else the compositor's.

Pure data but for what the host has and makes (`host_problem`, `untrusted_cookie`,
`host_cookie`, and whether the compositor offers security contexts). No trio, no engine.
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

Mode = Literal["none", "host-x11", "host-x11-untrusted", "xephyr", "xpra", "wayland"]
# which way xpra carries the clipboard between the host's and the app's display
Clipboard = Literal["none", "to-sandbox", "from-sandbox", "both"]
UNTRUSTED_TIMEOUT = 3600  # s an untrusted cookie outlives the app's last X connection
NESTED = "Xephyr"
XPRA_SOCKETS = "/run/bbl/xpra"  # the xpra server's socket directory, as both sides see it
XPRA_SCREEN = "3840x2160"  # the most the xpra server's Xvfb can grow to (it follows the host's)
SOCKETS = "/tmp/.X11-unix"  # where X clients look for display N's socket (XN)
AUTHORITY = "/run/bbl/Xauthority"  # the app's XAUTHORITY
FAMILY_WILD = 0xFFFF  # an Xauthority entry for any host: the sandbox has its own hostname


class Gui(Struct, forbid_unknown_fields=True, kw_only=True):
    mode: Mode = "xephyr"
    size: str = "1280x800"  # of the nested display (and its window)
    resizable: bool = True  # the nested display follows its window's size
    # xephyr: its window's, default "[bbl:NAME] NAME"; xpra: each window's, where "@title@"
    # is the app's own, default "[bbl:NAME] @title@"
    title: str | None = None
    # a window manager or a whole desktop session, run beside the app (layer4a): the
    # "isolated desktop"
    session: list[str] = []
    clipboard: Clipboard = "none"  # (xpra)


OPTIONS = {"xephyr": ("size", "resizable", "title", "session"), "xpra": ("title", "clipboard")}
# the xpra client's answer to each clipboard policy (it is the trusted side: it enforces it)
CLIPBOARD_DIRECTION = {"to-sandbox": "to-server", "from-sandbox": "to-client", "both": "both"}


def of(value: str | Gui) -> Gui:
    return Gui(mode=value) if isinstance(value, str) else value


def problems(value: Gui, net_mode: str) -> list[tuple[str, str]]:
    """(where, what is wrong) for the words, without looking at the host."""
    found = []
    default = Gui()
    for name in value.__struct_fields__:
        if name != "mode" and getattr(value, name) != getattr(default, name) and \
                value.mode not in (modes := [m for m, o in OPTIONS.items() if name in o]):
            found.append((f"$.gui.{name}", "needs mode = " + " or ".join(f'"{m}"' for m in modes)
                          + f" (mode {value.mode!r} has no such option)"))
    if value.mode not in ("xephyr", "xpra", "host-x11-untrusted"):
        return found
    if net_mode == "host":  # (the abstract socket lives in the network namespace)
        found.append(("$.gui", f"\"{value.mode}\" with net = \"host\": the app could reach the "
                      "host's display through its abstract socket (@/tmp/.X11-unix/X0) without "
                      "the mode's own cookie; use net = \"none\" or \"nat\""))
    if value.mode == "xephyr" and not re.fullmatch(r"[1-9]\d{1,4}x[1-9]\d{1,4}", value.size):
        found.append(("$.gui.size", f"{value.size!r} must be WIDTHxHEIGHT, e.g. \"1280x800\""))
    if value.session and not value.session[0]:
        found.append(("$.gui.session", "must name a program, e.g. [\"twm\"]"))
    return found


def host_display(environ: dict[str, str]) -> int | None:
    """The display number $DISPLAY names (":0", ":0.0", "unix:0"), None if it names none."""
    match = re.fullmatch(r"(?:unix)?:(\d+)(?:\.\d+)?", environ.get("DISPLAY", ""))
    return int(match.group(1)) if match else None


def host_problem(value: Gui, environ: dict[str, str]) -> str | None:
    """What this host lacks for `value`, as one line with the fix; None if nothing."""
    if value.mode == "host-x11-untrusted":
        return _untrusted_problem(environ)
    if value.mode == "host-x11":
        return _display_socket_problem("host-x11", environ)
    if value.mode == "wayland":
        return _wayland_problem(environ)
    if value.mode == "xephyr":
        found = _program_problem(NESTED, "xserver-xephyr", environ) or _nested_problem(environ)
    elif value.mode == "xpra":
        found = _program_problem("xpra", "xpra", environ) or _program_problem(
            "Xvfb", "xvfb", environ) or _painter_problem() or _nested_problem(environ)
    else:
        return None
    return found and f"{value.mode} {found}"


def _program_problem(program: str, package: str, environ: dict[str, str]) -> str | None:
    if _which(program, environ) is None:
        return f"needs {program}, which is not installed: apt install {package}"
    return None


def _which(program: str, environ: dict[str, str]) -> str | None:
    return shutil.which(program, path=environ.get("PATH") or os.defpath)


def _painter_problem() -> str | None:
    """xpra's client paints windows with cairo through PyGObject: without the binding
    (Debian's python3-gi-cairo, which xpra only recommends) every window stays black."""
    gi = "/usr/lib/python3/dist-packages/gi"
    if os.path.isdir(gi) and not any(n.startswith("_gi_cairo") for n in os.listdir(gi)):
        return ("cannot paint windows without PyGObject's cairo binding: apt install "
                "python3-gi-cairo")
    return None


def _nested_problem(environ: dict[str, str]) -> str | None:
    """The host's display as a trusted helper layer reaches it: through its abstract socket
    (the helper layer has a socket directory of its own)."""
    number = host_display(environ)
    if number is None:
        return ("shows windows on the host's display, and DISPLAY names none "
                f"({environ.get('DISPLAY', 'unset')!r}): start it from the desktop session")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(f"\0{SOCKETS}/X{number}")
        except OSError as exc:
            return (f"reaches the host's display :{number} through its abstract socket "
                    f"@{SOCKETS}/X{number}, which does not answer ({exc.strerror})")
    return None


def _untrusted_problem(environ: dict[str, str]) -> str | None:
    if _which("xauth", environ) is None:
        return "host-x11-untrusted makes its cookie with xauth, which is not installed: " \
               "apt install xauth"
    missing = _display_socket_problem("host-x11-untrusted", environ)
    if missing:
        return missing
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


def _display_socket_problem(mode: str, environ: dict[str, str]) -> str | None:
    """The host display's socket, which the mode binds, is not there."""
    number = host_display(environ)
    if number is None:
        return (f"{mode} binds the host display's socket, and DISPLAY names none "
                f"({environ.get('DISPLAY', 'unset')!r}): start it from the desktop session")
    if not os.path.exists(f"{SOCKETS}/X{number}"):
        return (f"{mode} binds the host display's socket {SOCKETS}/X{number}, which is not "
                "there: is the display running? (DISPLAY names it)")
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
    """What the template adds for a display of the app's own: the trusted helper layer that
    shows it on the host's display, layer3's view and variables, the socket the app's
    layers wait for, the session beside the app, and the untrusted server beside it."""
    layer: spec.Layer | None = None  # layer2x, under layer2: Xephyr, or the xpra client
    fs: list = []  # in layer3
    env: dict[str, str] = {}  # in layer3
    start_after: list[str] = []  # layer3's path of the display's socket
    session: list[str] | None = None  # in layer4a
    server: spec.Layer | None = None  # layer4x, under layer3: the xpra server
    helper_dirs: list[str] = []  # tmpfs mounted in layer1's tmpfs of the helpers' sockets
    helpers: bool = False  # uses the helpers' directory (layer1's tmpfs)
    companion: list[str] | None = None  # a trusted helper in layer2a (early)
    notice: str | None = None  # what the host lacked, and what was done instead


def parts(value: Gui, name: str, environ: dict[str, str], uid: int, gid: int,
          helper_dir: str, system: list, app_id: str | None = None) -> Parts:
    """The template's parts for `value` (`name`: the instance's, for the window titles;
    `system`: the operations that show the system's directories read-only; `app_id`: the
    app's, for a Wayland security context)."""
    if value.mode == "xephyr":
        return _xephyr(value, name, environ, uid, gid, helper_dir, system)
    if value.mode == "xpra":
        return _xpra(value, name, environ, uid, gid, helper_dir, system)
    if value.mode == "wayland":
        return _wayland(name, environ, uid, helper_dir, app_id)
    return Parts()


def _wayland(name: str, environ: dict[str, str], uid: int, helper_dir: str,
             app_id: str | None) -> Parts:
    """A socket of the instance's own that the compositor tags as the sandbox's
    (wp_security_context_manager_v1, made by a helper in layer2a: bbld.wayland), else the
    compositor's own socket, with a notice."""
    import sys

    from bbld import wayland

    compositor = wayland_socket(environ)
    inside = f"/run/user/{uid}/wayland-0"
    try:
        tagged = wayland.offers_security_context(compositor)
    except OSError:
        tagged = False  # (host_problem said it answers: then it answered nothing useful)
    if not tagged:
        return Parts(fs=[spec.RoBind(src=compositor, dest=inside, origin="gui")],
                     notice="the compositor offers no security context "
                            "(wp_security_context_manager_v1): the app gets its own socket, "
                            "with every client's rights")
    socket_name = "wayland-0"
    return Parts(
        helpers=True,
        companion=[sys.executable, "-I", "-m", "bbld.wayland", compositor,
                   f"{helper_dir}/{socket_name}", app_id or name, name],
        fs=[spec.Symlink(target_path=f"{dbus.HELPERS}/{socket_name}", dest=inside,
                         origin="gui")],
        start_after=[f"{dbus.HELPERS}/{socket_name}"])


def _xephyr(value: Gui, name: str, environ: dict[str, str], uid: int, gid: int,
            helper_dir: str, system: list) -> Parts:
    number = _own_display(environ)
    authority = xauthority_entry(str(number), secrets.token_bytes(16))
    argv = [_which(NESTED, environ) or NESTED,
            f":{number}", "-auth", "/tmp/xephyr.auth", "-nolisten", "tcp", "-nolisten",
            "local", "-screen", value.size,
            "-title", value.title or f"[bbl:{name}] {name}"]
    if value.resizable:
        argv.append("-resizeable")
    # Xephyr's socket directory is the helpers' (layer1's tmpfs), so that neither its socket
    # nor its lock file lands on the host; it does not listen on the abstract socket
    # ("-nolisten local")
    fs = [spec.Bind(src=helper_dir, dest=SOCKETS),
          spec.RoBindData(dest="/tmp/xephyr.auth", data=authority, mode=0o400),
          spec.Tmpfs(dest="/var/lib/xkb", mode=0o755)]
    return Parts(
        layer=_host_side(fs, argv, name, environ, uid, gid, system), helpers=True,
        fs=[spec.Symlink(target_path=dbus.HELPERS, dest=SOCKETS, origin="gui"),
            spec.RoBindData(dest=AUTHORITY, data=authority, mode=0o400, origin="gui")],
        env={"DISPLAY": f":{number}", "XAUTHORITY": AUTHORITY},
        start_after=[f"{SOCKETS}/X{number}"],
        session=list(value.session) or None)


def _xpra(value: Gui, name: str, environ: dict[str, str], uid: int, gid: int,
          helper_dir: str, system: list) -> Parts:
    """The xpra server and its Xvfb beside the app (layer4x, untrusted, in the sandbox's own
    network namespace: its display is nobody else's); the client in layer2x (trusted),
    attached through the server's socket in a tmpfs of layer1's (within the helpers') that
    layer3 shows writable at XPRA_SOCKETS, and started when that socket accepts."""
    number = _own_display(environ)
    authority = xauthority_entry(str(number), secrets.token_bytes(16))
    home = environ.get("HOME") or f"/home/{uid}"
    sockets = f"{helper_dir}/xpra"
    common = ["--mdns=no", "--pulseaudio=no", "--notifications=no", "--speaker=off",
              "--microphone=off", "--webcam=no", "--printing=no", "--file-transfer=no",
              "--open-files=no", "--open-url=no", "--system-tray=no", "--bell=no", "--mmap=no",
              "--remote-logging=no", *_clipboard(value.clipboard)]
    server_argv = [
        _which("xpra", environ) or "xpra", "start", f":{number}", "--daemon=no",
        f"--bind={XPRA_SOCKETS}/server", "--start=", "--dbus-launch=",
        "--dbus-proxy=no", "--dbus-control=no", "--systemd-run=no", "--html=off",
        "--start-new-commands=no", "--sharing=no", "--xsettings=no", "--input-method=none",
        *common,
        "--xvfb=Xvfb +extension Composite -screen 0 " + XPRA_SCREEN + "x24+32 -dpi 96 "
        "-nolisten tcp -noreset -auth $XAUTHORITY"]
    # the server's own home and configuration: Debian's /etc/xpra starts an X session
    # (whose dbus-launch, at-spi and ssh-agent outlived it) and the user's home is not xpra's
    # to write. Its Xvfb reads our cookie (layer3's XAUTHORITY; xpra's own attempt to add
    # one to that read-only file fails, and does not matter)
    server = spec.Layer(
        name="layer4x", namespaces=["user", "pid", "mount"], uid=uid, gid=gid,
        seccomp=spec.Seccomp(policy="default"),
        fs=[spec.Tmpfs(dest="/etc/xpra", mode=0o755, origin="gui"),
            spec.Tmpfs(dest=home, mode=0o700, origin="gui")],
        companions=[spec.Command(argv=server_argv, early=True, output="null")])
    title = value.title or f"[bbl:{name}] @title@"
    client_argv = [_which("xpra", environ) or "xpra", "attach",
                   f"socket://{XPRA_SOCKETS}/server", f"--title={title}", "--tray=no",
                   "--opengl=no", *common]
    client_fs = [spec.RoBind(src=sockets, dest=XPRA_SOCKETS),
                 spec.Tmpfs(dest="/etc/xpra", mode=0o755)]
    client = _host_side(client_fs, client_argv, name, environ, uid, gid, system)
    client = msgspec.structs.replace(client, start_after=[f"{sockets}/server"],
                                     companions=[spec.Command(argv=client_argv, output="null")])
    return Parts(
        layer=client, helpers=True,
        fs=[spec.Bind(src=sockets, dest=XPRA_SOCKETS, origin="gui"),
            spec.Dir(dest=SOCKETS, mode=0o1777, origin="gui"),
            spec.RoBindData(dest=AUTHORITY, data=authority, mode=0o400, origin="gui")],
        env={"DISPLAY": f":{number}", "XAUTHORITY": AUTHORITY},
        start_after=[f"{SOCKETS}/X{number}"],
        server=server, helper_dirs=[sockets])


def _clipboard(policy: Clipboard) -> list[str]:
    if policy == "none":
        return ["--clipboard=no"]
    return ["--clipboard=yes", f"--clipboard-direction={CLIPBOARD_DIRECTION[policy]}"]


def _own_display(environ: dict[str, str]) -> int:
    """The number of the app's display: not the host's (a host-side helper is its client)."""
    return 1 if host_display(environ) != 1 else 2


def _host_side(fs: list, argv: list[str], name: str, environ: dict[str, str], uid: int,
               gid: int, system: list) -> spec.Layer:
    """layer2x: a trusted helper shown on the host's display, started as soon as it is
    built. Its own view: the system read-only, a private /tmp and home, the host's display
    reached through its abstract socket with a copy of the user's cookie for that display
    alone (the wildcard family: the layer has a hostname of its own, the instance's, so
    that the xpra client does not tell the host's to the server), and `fs`."""
    view = [*system, spec.Proc(dest="/proc"),
            *(spec.DevBind(src=f"/dev/{node}", dest=f"/dev/{node}")
              for node in ("null", "zero", "urandom")),
            spec.Tmpfs(dest="/tmp", mode=0o1777), *fs]
    cookie = host_cookie(environ)
    if cookie:
        view.append(spec.RoBindData(dest=AUTHORITY, data=cookie, mode=0o400))
    return spec.Layer(name="layer2x", namespaces=["user", "pid", "mount", "uts"], uid=uid,
                      gid=gid, hostname=name[:64], new_root=True,
                      fs=[msgspec.structs.replace(op, origin="gui") for op in view],
                      env=spec.Env(set={"XAUTHORITY": AUTHORITY, "HOME": "/tmp",
                                        "XDG_RUNTIME_DIR": "/tmp"}),
                      companions=[spec.Command(argv=argv, early=True, output="null")])


def host_cookie(environ: dict[str, str]) -> bytes:
    """The user's Xauthority entries for the host's display, in the wildcard family
    (b"" when there are none)."""
    home = environ.get("HOME")
    authority = environ.get("XAUTHORITY") or os.path.join(
        home if home and os.path.isabs(home) else os.path.expanduser("~"), ".Xauthority")
    try:
        with open(authority, "rb") as f:
            return xauthority_for(f.read(), str(host_display(environ)))
    except OSError:
        return b""


def xauthority_entry(display: str, cookie: bytes, kind: bytes = b"MIT-MAGIC-COOKIE-1") -> bytes:
    """One Xauthority entry: any host (FamilyWild), `display`, `kind` (MIT-MAGIC-COOKIE-1)."""
    fields = (b"", display.encode(), kind, cookie)
    return FAMILY_WILD.to_bytes(2, "big") + b"".join(
        len(f).to_bytes(2, "big") + f for f in fields)
