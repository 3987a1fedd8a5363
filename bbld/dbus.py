"""D-Bus for the app: the profile's `dbus` option, checked, and the template's parts for it.

`host` binds the session bus's socket itself; `filtered` puts xdg-dbus-proxy between the app
and each bus (docs/profiles.md). The proxy runs in layer2a as a trusted companion (the host's
view, the user's uid, so that the bus's EXTERNAL authentication sees the user), listening in a
private tmpfs that layer1 mounts over BBL's runtime directory: no layer sees bbld's socket
there, and nothing is left on the host when the instance ends, however it ends. Layer3 shows
the sockets' directory with links where apps expect a bus; the app's layers start only once
the proxy listens (`start_after`).

The grammar of names and rules is xdg-dbus-proxy's, checked here first so that a mistake is a
line in the profile, not a proxy that exits at start; so is the host's side (the proxy
installed, each bus answering). No trio, no engine.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Literal
from urllib.parse import unquote

from msgspec import Struct

from bbld import spec

# a well-known bus name (what GLib's g_dbus_is_name accepts, without unique ":1.5" names):
# two or more elements, each letters, digits, _ and -, not starting with a digit; 255 at most
_ELEMENT = r"[A-Za-z_-][A-Za-z0-9_-]*"
BUS_NAME = re.compile(rf"{_ELEMENT}(?:\.{_ELEMENT})+")
_MEMBER = r"[A-Za-z_][A-Za-z0-9_]*"
# RULE of --call/--broadcast NAME=RULE: [METHOD][@PATH], METHOD `*`, `IFACE.*` or
# `IFACE.MEMBER`, PATH an object path, `/*` at its end for the subtree
RULE = re.compile(rf"(?P<method>\*|{_MEMBER}(?:\.{_MEMBER})+(?:\.\*)?)?"
                  r"(?:@(?P<path>/|(?:/[A-Za-z0-9_]+)+)(?P<subtree>/\*)?|@/\*)?")
SESSION, SYSTEM = "session", "system"
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
# where the app finds each bus (the D-Bus specification's default system bus path, and
# $XDG_RUNTIME_DIR/bus, which sd-bus and GDBus also try without DBUS_SESSION_BUS_ADDRESS)
INSIDE = {SESSION: "/run/user/{uid}/bus", SYSTEM: "/run/dbus/system_bus_socket"}
VARIABLE = {SESSION: "DBUS_SESSION_BUS_ADDRESS", SYSTEM: "DBUS_SYSTEM_BUS_ADDRESS"}
PROXY = "xdg-dbus-proxy"


class BusRules(Struct, forbid_unknown_fields=True, kw_only=True):
    """xdg-dbus-proxy's policy for one bus: names (`org.example.App`, or `org.example.*` for
    a name and everything below it) the app may see, talk to, own; `call`/`broadcast` rules
    `NAME=[METHOD][@PATH]` for the calls it may make and the signals it receives."""
    see: list[str] = []
    talk: list[str] = []
    own: list[str] = []
    call: list[str] = []
    broadcast: list[str] = []


class DBus(BusRules, forbid_unknown_fields=True, kw_only=True):
    """The profile's `[dbus]` table: the session bus's rules, the system bus's (none: no
    system bus at all) and the proxy's log."""
    mode: Literal["none", "host", "filtered"] = "filtered"
    system: BusRules | None = None
    log: bool = False  # xdg-dbus-proxy --log: every message it passes or refuses


class DBusError(ValueError):
    """The host side of a bus is not usable; the message says what and how to fix it."""


def of(option: str | DBus) -> DBus:
    """The profile's `dbus` value as a table (`dbus = "filtered"` is `[dbus]` with no rules)."""
    return option if isinstance(option, DBus) else DBus(mode=option)


def problems(options: DBus, app_id: str | None) -> list[tuple[str, str]]:
    """(where, what) for every name or rule xdg-dbus-proxy would refuse or misread."""
    found = []
    if app_id is not None and not _name_ok(app_id, wildcard=False):
        found.append(("$.app_id", f"{app_id!r} is not a D-Bus name like org.example.App"))
    if options.mode != "filtered":
        if options.system is not None or _has_rules(options) or options.log:
            found.append(("$.dbus.mode", f"{options.mode!r} takes no rules; rules, system and "
                          "log need mode = \"filtered\""))
        return found
    buses = [("$.dbus", options)]
    if options.system is not None:
        buses.append(("$.dbus.system", options.system))
    for where, rules in buses:
        for kind in ("see", "talk", "own"):
            for index, name in enumerate(getattr(rules, kind)):
                if not _name_ok(name):
                    found.append((f"{where}.{kind}[{index}]", f"{name!r} is not a bus name "
                                  "(like org.example.App, or org.example.* for a subtree)"))
        for kind in ("call", "broadcast"):
            for index, entry in enumerate(getattr(rules, kind)):
                problem = _rule_problem(entry)
                if problem:
                    found.append((f"{where}.{kind}[{index}]", problem))
    return found


def _has_rules(rules: BusRules) -> bool:
    return any(getattr(rules, kind) for kind in ("see", "talk", "own", "call", "broadcast"))


def _name_ok(name: str, wildcard: bool = True) -> bool:
    if wildcard:
        name = name.removesuffix(".*")
    return len(name) <= 255 and BUS_NAME.fullmatch(name) is not None


def _rule_problem(entry: str) -> str | None:
    name, equals, rule = entry.partition("=")
    if not equals:
        return f"{entry!r} must be NAME=RULE, RULE being [METHOD][@PATH] (e.g. " \
               "org.example.App=org.example.App.Open@/org/example/App)"
    if not _name_ok(name):
        return f"{name!r} is not a bus name (like org.example.App, or org.example.*)"
    if RULE.fullmatch(rule) is None:
        return f"rule {rule!r}: must be [METHOD][@PATH]: METHOD *, IFACE.* or IFACE.MEMBER, " \
               "PATH an object path (/org/example), /* at its end for everything below it"
    return None


# ---------------------------------------------------------------- the host's buses


def host_address(bus: str, environ: dict[str, str]) -> str:
    """The address of the host's `bus`, as its clients would find it; DBusError when it is not
    set or does not answer."""
    address = environ.get(VARIABLE[bus], "")
    if not address and bus == SYSTEM:
        address = DEFAULT_SYSTEM_BUS
    elif not address:
        runtime = environ.get("XDG_RUNTIME_DIR", "")
        fallback = os.path.join(runtime, "bus") if os.path.isabs(runtime) else ""
        if not fallback or not os.path.exists(fallback):
            raise DBusError("there is no session bus: DBUS_SESSION_BUS_ADDRESS is not set (nor "
                            "is there $XDG_RUNTIME_DIR/bus); run it from your desktop session, "
                            "or set dbus = \"none\"")
        address = f"unix:path={fallback}"
    problem = _unreachable(address)
    if problem:
        raise DBusError(f"the {bus} bus ({VARIABLE[bus]}={address}) {problem}; start it, or "
                        f"leave it out of the profile")
    return address


def _entries(address: str):
    """(entry, transport, {key: value}) for each address of a D-Bus address list."""
    for entry in address.split(";"):
        transport, _, keys = entry.partition(":")
        yield entry, transport, {key: unquote(value) for key, _, value in
                                 (item.partition("=") for item in keys.split(",") if item)}


def socket_path(address: str) -> str | None:
    """The socket file of a `unix:path=` address (the first one of a list), else None."""
    return next((values["path"] for _, transport, values in _entries(address)
                 if transport == "unix" and "path" in values), None)


def _unreachable(address: str) -> str | None:
    """Why nothing at `address` accepts a connection (None: something does). Only unix
    sockets: a path, or an abstract name (in this network namespace)."""
    reasons = []
    for entry, transport, values in _entries(address):
        if transport != "unix" or not ({"path", "abstract"} & values.keys()):
            reasons.append(f"{entry!r} is not a unix socket address BBL can proxy")
            continue
        target = values["path"] if "path" in values else "\0" + values["abstract"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.settimeout(2)
            try:
                probe.connect(target)
                return None
            except OSError as exc:
                reasons.append(f"does not answer ({exc.strerror or exc})")
    return reasons[0] if reasons else "is empty"


def proxy_program(environ: dict[str, str]) -> str:
    """xdg-dbus-proxy's path; DBusError naming the package when it is missing."""
    import shutil

    found = shutil.which(PROXY, path=environ.get("PATH") or os.defpath)
    if found is None:
        raise DBusError(f"dbus = \"filtered\" runs {PROXY}, which is not installed: apt install "
                        f"{PROXY} (or dnf/pacman install xdg-dbus-proxy)")
    return found


# ---------------------------------------------------------------- the template's parts


class Parts(Struct, kw_only=True):
    """What the template adds for D-Bus: layer1's directory for the proxy's sockets,
    layer2a's companion, layer3's view of the sockets and variables, and the sockets the
    app's layers wait for."""
    helpers: bool = False  # the proxy's sockets need layer1's tmpfs over the runtime dir
    companion: list[str] | None = None  # the proxy, in layer2a
    fs: list = []  # in layer3
    env: dict[str, str] = {}  # in layer3
    start_after: list[str] = []  # layer3's paths of the proxy's sockets (layer4 waits for them)


HELPERS = "/run/bbl/helpers"  # where layer3 shows the sockets trusted helpers offer the app


def parts(options: DBus, app_id: str | None, environ: dict[str, str], uid: int,
          helper_dir: str) -> Parts:
    """The template's parts for `options`; DBusError when the host cannot give them.

    The proxy's sockets are made after layer3's view is built: layer3 binds their directory
    (layer1's tmpfs, `helper_dir`) and links the paths apps expect to them, so that only the
    app's layers (small ones) wait for the proxy, not layer3's whole view."""
    if options.mode == "none":
        return Parts()
    inside = {bus: path.format(uid=uid) for bus, path in INSIDE.items()}
    session = host_address(SESSION, environ)
    if options.mode == "host":
        path = socket_path(session)
        if path is None:
            raise DBusError(f"dbus = \"host\" binds the session bus's socket file, and "
                            f"DBUS_SESSION_BUS_ADDRESS={session} names none; use dbus = "
                            "\"filtered\" (the proxy reaches abstract addresses)")
        return Parts(fs=[spec.Bind(src=path, dest=inside[SESSION], origin="dbus")],
                     env={VARIABLE[SESSION]: f"unix:path={inside[SESSION]}"})
    found = Parts(helpers=True, fs=[spec.RoBind(src=helper_dir, dest=HELPERS, origin="dbus")])
    argv = [proxy_program(environ)]
    buses = [(SESSION, options)] + ([(SYSTEM, options.system)] if options.system else [])
    for bus, rules in buses:
        address = session if bus == SESSION else host_address(SYSTEM, environ)
        argv += [address, os.path.join(helper_dir, f"dbus-{bus}"), "--filter",
                 *proxy_rules(rules, app_id if bus == SESSION else None)]
        if options.log:
            argv.append("--log")
        found.fs.append(spec.Symlink(target_path=f"{HELPERS}/dbus-{bus}", dest=inside[bus],
                                     origin="dbus"))
        found.env[VARIABLE[bus]] = f"unix:path={inside[bus]}"
        found.start_after.append(f"{HELPERS}/dbus-{bus}")
    found.companion = argv
    return found


def proxy_rules(rules: BusRules, app_id: str | None) -> list[str]:
    """xdg-dbus-proxy's options for `rules`; the app may own its own id's names (as under
    Flatpak)."""
    own = list(rules.own)
    if app_id is not None and f"{app_id}.*" not in own:
        own.insert(0, f"{app_id}.*")
    return ([f"--see={name}" for name in rules.see] + [f"--talk={name}" for name in rules.talk]
            + [f"--own={name}" for name in own] + [f"--call={rule}" for rule in rules.call]
            + [f"--broadcast={rule}" for rule in rules.broadcast])
