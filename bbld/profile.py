"""Profiles: TOML files that say what to sandbox, expanded into a layer-tree spec.

A profile either holds a few user options (this module's `Profile`), which expand into BBL's
default nested template, or spells out its own tree with a `[layer]` table, exactly as a
spec does (docs/spec.md). Both are checked before anything starts; errors name the file, the
line and the field. Pure data: no trio, no engine.

The template (see docs/profiles.md):

    layer1   user + pid namespaces, uid 0: holds the instance together (and, for helpers'
             sockets, a tmpfs over BBL's runtime directory)
    └─ layer2   semi-trusted: its own mount namespace, the host view with private paths masked
       ├─ layer2a  trusted companions (capabilities dropped): the D-Bus proxy, the user's
       ├─ layer2x  with gui = "xephyr" or "xpra": the nested X server, or the xpra client
       │           that shows the app's windows on the host's display (bbld.gui)
       └─ layer2h  intermediary
          └─ layer3   untrusted zone: every namespace, a new root of system directories
             ├─ layer4   the app, back to the user's uid
             ├─ layer4a  untrusted companions
             └─ layer4x  with gui = "xpra": the xpra server and the app's display (Xvfb)
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import stat
from typing import Literal

import msgspec
from msgspec import Struct, field

from bbld import dbus, gui, limits, net, paths, spec

BUILTIN = os.path.join(os.path.dirname(__file__), "profiles")
# Commands that would open a URL or file outside the sandbox (or a second, unsandboxed
# browser): hidden in layer3 so that an app cannot hand anything to the host's desktop.
OPENERS = ("xdg-open", "gio", "kde-open", "kde-open5", "gnome-open", "exo-open",
           "sensible-browser", "x-www-browser", "www-browser", "firefox", "firefox-esr",
           "chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "brave",
           "brave-browser", "microsoft-edge", "opera", "vivaldi", "epiphany", "konqueror",
           "falkon", "qutebrowser", "midori", "librewolf")
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
FUSE = "/dev/fuse"  # what an AppImage mount opens (bbld.engine.squashfs)
HELPERS_TIMEOUT = 10.0  # seconds the app waits for its helpers' sockets (they take ~5 ms)
PASSED_ENV = ["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TERM", "COLORTERM", "TZ"]


class ProfileError(ValueError):
    """Problems with a profile, one line each: `FILE:LINE: field: what is wrong`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Mount(Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["bind", "ro-bind", "appimage"] = "ro-bind"
    src: str  # ~ is the user's home
    dest: str | None = None  # default: the same path inside (an AppImage: /sbx/apps/NAME)


class Masks(Struct, forbid_unknown_fields=True, kw_only=True):
    openers: bool = True  # xdg-open and browsers
    os_release: bool = True
    machine_id: bool = True  # zeroed
    paths: list[str] = []  # never exposed, in any layer below layer2


class Environment(Struct, forbid_unknown_fields=True, kw_only=True):
    pass_: list[str] = field(default_factory=lambda: list(PASSED_ENV), name="pass")
    set: dict[str, str] = {}


class Profile(Struct, forbid_unknown_fields=True, kw_only=True):
    name: str | None = None  # default: the file's name
    instance: Literal["single", "multi"] = "multi"
    # the app; None: an interactive shell, which `bblctl start PROFILE -- CMD ...` replaces
    command: list[str] | None = None
    send_args: list[str] | None = None
    home: str = "tmpfs"  # or a host directory, bound at the same $HOME path inside
    app_id: str | None = None  # reverse-DNS id (org.example.App): the D-Bus names it may own
    # "host-x11": the host's display; "xephyr" (or a [gui] table): a display of its own (bbld.gui)
    gui: gui.Mode | gui.Gui = "none"
    dbus: Literal["none", "host", "filtered"] | dbus.DBus = "none"
    mounts: list[Mount] = []
    opt: bool = False
    hardware: Literal["none", "gpu", "all"] = "none"
    masks: Masks = field(default_factory=Masks)
    env: Environment = field(default_factory=Environment)
    # untrusted apps get no network unless asked; "nat" (or a [net] table): their own,
    # through user-mode NAT, with forwards, shaping and egress rules (bbld.net)
    net: net.Mode | net.Net = "none"
    dns: list[str] = []
    # rlimits of the app and its untrusted helpers ("nproc"), and the untrusted zone's cgroup
    # limits: pids, memory, memory_high, swap, cpu, io_weight; required (bbld.limits)
    limits: dict[str, int | float | str | bool] = {}
    companions: list[list[str]] = []  # trusted helpers, in layer2a
    untrusted_companions: list[list[str]] = []  # in layer4a, beside the app


# ---------------------------------------------------------------- finding and loading


def directories(environ: dict[str, str] | None = None) -> list[str]:
    """Where profiles are looked up by name: the user's, then the built-in ones."""
    environ = os.environ if environ is None else environ
    config = environ.get("XDG_CONFIG_HOME")
    if not (config and os.path.isabs(config)):
        config = os.path.join(_home(environ), ".config")
    return [os.path.join(config, "bbl", "profiles"), BUILTIN]


def _home(environ) -> str:
    home = environ.get("HOME")
    return home if home and os.path.isabs(home) else os.path.expanduser("~")


def find(name_or_path: str, environ: dict[str, str] | None = None) -> str:
    """A profile file by path (contains a /, or ends in .toml) or by name (looked up in the
    directories `environ` names)."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        if not os.path.isfile(name_or_path):
            raise ProfileError([f"{name_or_path}: " + ("not a regular file" if os.path.exists(
                name_or_path) else "no such profile file")])
        return name_or_path
    if not spec.NAME_PATTERN.match(name_or_path):
        raise ProfileError([f"{name_or_path!r}: not a profile name (letters, digits, . _ -)"])
    for directory in directories(environ):
        path = os.path.join(directory, f"{name_or_path}.toml")
        if os.path.isfile(path):
            return path
    raise ProfileError([f"no profile named {name_or_path!r} in "
                        f"{' or '.join(directories(environ))}; see `bblctl profile list`"])


def available() -> dict[str, str]:
    """Profile name -> file, the user's shadowing the built-in ones."""
    found: dict[str, str] = {}
    for directory in reversed(directories()):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith(".toml"):
                found[name[:-5]] = os.path.join(directory, name)
    return dict(sorted(found.items()))


def load(path: str, environ: dict[str, str] | None = None, uid: int | None = None,
         gid: int | None = None, notices: list[str] | None = None,
         name: str | None = None, located: bool = False) -> spec.Sandbox:
    """The checked spec a profile file means (`name`: the instance's, instead of the
    profile's: also the sandbox's hostname). Raises ProfileError with every problem; what
    the host could not give and what was done instead goes to `notices` (FILE:LINE: ...).
    `located`: operations from the profile's keys name its file and line (for a start)."""
    environ = dict(os.environ) if environ is None else environ
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    text = _read(path)
    raw = _decode(path, text)
    if "layer" in raw:  # a tree of its own, with the spec's keys
        sandbox = _convert(raw, spec.Sandbox, path, text)
        if "name" not in raw:
            sandbox.name = _default_name(path)
        _check_bus_identities(sandbox.layer, uid, path, text)
    else:
        options, problems, numbering = _options(raw, path, text)
        problems += _option_problems(options, path, text, numbering)
        problems += _missing_sources(options, environ, path, text, numbering)
        said: list[tuple[str, str]] = []
        # What the host lacks for a key whose words are right (bbld's cgroup: its own):
        wrong = {_place(problem, path)[1] for problem in problems}
        for key, problem in (("net", net.host_problem(net.of(options.net), environ)),
                             ("gui", gui.host_problem(gui.of(options.gui), environ))):
            if problem and key not in wrong:
                problems.append(f"{path}:{line_of(text, '$.' + key)}: {key}: {problem}")
        lacking, problem = limits.missing(options.limits) if "limits" not in wrong else ([], "")
        if lacking and options.limits.get("required", True):
            problems.append(f"{path}:{line_of(text, '$.limits')}: limits: {problem}")
        if problems:
            raise ProfileError(_in_file_order(problems, path))
        if lacking:  # (required = false)
            said.append(("limits", f"{problem}; running without them"))
            options.limits = {k: v for k, v in options.limits.items() if k not in lacking}
        try:
            sandbox = expand(options, name or options.name or _default_name(path), environ,
                             uid, gid, said)
        except dbus.DBusError as exc:  # (the host's side: a bus, the proxy)
            raise ProfileError([f"{path}:{line_of(text, '$.dbus')}: dbus: {exc}"]) from None
        except gui.DisplayError as exc:  # (the host's display)
            raise ProfileError([f"{path}:{line_of(text, '$.gui')}: gui: {exc}"]) from None
        if notices is not None:
            notices += [f"{path}:{line_of(text, '$.' + key)}: {key}: {notice}"
                        for key, notice in said]
        if located:
            _locate_origins(sandbox, path, text)
    try:
        spec.check(sandbox, uid, gid)
    except spec.SpecError as exc:
        raise ProfileError([f"{path}: {problem}" for problem in exc.problems]) from None
    return sandbox


def _locate_origins(sandbox: spec.Sandbox, path: str, text: str) -> None:
    """Operations that come from a key the profile has say FILE:LINE too, so that a start
    failing on one names the profile's line (`FILE:4: mounts[0] (ro-bind) /x: ...`)."""
    for layer, _parent in spec.walk(sandbox.layer):
        for op in layer.fs:
            key = (op.origin or "").split("[")[0].split(".")[0]
            if key and re.search(rf"^\s*\[?\s*{re.escape(key)}\b", text, re.MULTILINE):
                op.origin = f"{path}:{line_of(text, '$.' + op.origin)}: {op.origin}"


def checked_name(path: str) -> str:
    """The instance name a profile gives, once its words are checked; nothing of the host is
    asked (no display, bus, compositor or cgroup: `load` does that, and may act on them).
    Raises ProfileError."""
    text = _read(path)
    raw = _decode(path, text)
    if "layer" in raw:
        return raw.get("name") or _convert(raw, spec.Sandbox, path, text).name \
            or _default_name(path)
    options, problems, numbering = _options(raw, path, text)
    problems += _option_problems(options, path, text, numbering)
    if problems:
        raise ProfileError(_in_file_order(problems, path))
    return options.name or _default_name(path)


def _in_file_order(problems: list[str], path: str) -> list[str]:
    """The problems sorted by their line (stable: a line's problems keep their order)."""
    return sorted(problems, key=lambda problem: _place(problem, path)[0])


def _place(problem: str, path: str) -> tuple[int, str]:
    """(LINE, top-level key) of a `PATH:LINE: key...: message` problem."""
    line, _, rest = problem.removeprefix(f"{path}:").partition(": ")
    return (int(line) if line.isdigit() else 0), re.split(r"[.\[:]", rest, maxsplit=1)[0]


def _decode(path: str, text: str) -> dict:
    try:
        return msgspec.toml.decode(text)
    except msgspec.DecodeError as exc:
        raise ProfileError([_toml_error(path, text, str(exc))]) from None


def _toml_error(path: str, text: str, message: str) -> str:
    """FILE:LINE: not valid TOML: WHAT. The parser says where it noticed; an unclosed
    bracket or quote is where it was opened, the last line before that holding one."""
    found = re.search(r"\s*\(at line (\d+), column \d+\)$", message)
    if not found:
        return f"{path}: not valid TOML: {message}"
    line, what = int(found.group(1)), message[:found.start()]
    if what.startswith("Unclosed"):
        opener = {"array": "[", "table": "{", "inline table": "{"}.get(
            what.split(" ", 1)[1] if " " in what else "", '"')
        lines = text.splitlines()
        line = next((n for n in range(min(line, len(lines)), 0, -1)
                     if opener in lines[n - 1]), line)
    return f"{path}:{line}: not valid TOML: {what}"


def _missing_sources(options: Profile, environ: dict[str, str], path: str,
                     text: str, numbering: dict) -> list[str]:
    """mounts whose source is not on the host, each as FILE:LINE: mounts[N].src: ... (a
    start would fail on them, in the generated tree's words)."""
    home = environ.get("HOME") or os.path.expanduser("~")
    found = []
    if options.home != "tmpfs" and os.path.isabs(_home_path(options.home, home)) \
            and not os.path.isdir(_home_path(options.home, home)):
        found.append(f"{path}:{line_of(text, '$.home')}: home: "
                     f"{_home_path(options.home, home)} is not a directory: create it "
                     "(mkdir -p), or fix the path")
    for index, mount in _numbered(options.mounts, numbering.get("mounts")):
        source = _home_path(mount.src, home)
        where = f"$.mounts[{index}].src"
        if not os.path.isabs(source):
            continue  # (_option_problems says so)
        if not os.path.lexists(source):
            found.append(f"{path}:{line_of(text, where)}: mounts[{index}].src: {source} does "
                         "not exist: create it, or fix the path")
        elif mount.type == "appimage" and not (os.path.isfile(source)
                                               and os.access(source, os.R_OK)):
            found.append(f"{path}:{line_of(text, where)}: mounts[{index}].src: {source} is "
                         "not a file you can read: an AppImage is one (chmod u+r, or fix "
                         "the path)")
        elif mount.type == "appimage" and not os.access(FUSE, os.R_OK | os.W_OK):
            found.append(f"{path}:{line_of(text, where)}: mounts[{index}]: an AppImage is "
                         f"mounted through FUSE, and {FUSE} is not usable by you: make it "
                         "mode 0666 (as root; desktop systems ship it so)")
    return found


MAX_SIZE = 1 << 20  # bytes: a profile is a page of TOML, not a file to read whatever its size


def _read(path: str) -> str:
    """The profile's text, if the file is one to trust (paths.check_private_file: the
    user's or root's, writable by nobody else, in directories nobody else can change), a
    regular file (opening a FIFO does not wait) and at most MAX_SIZE bytes."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ProfileError([f"{path}: not a regular file"])
            if info.st_size > MAX_SIZE:
                raise ProfileError([f"{path}: {info.st_size} bytes; a profile is at most "
                                    f"{MAX_SIZE >> 20} MiB"])
            paths.check_private_file(path, info)
            data = f.read(MAX_SIZE + 1)
    except paths.UnsafeDirectory as exc:
        raise ProfileError([f"refused: {exc}"]) from None
    except OSError as exc:
        raise ProfileError([f"{path}: cannot read: {exc.strerror}"]) from None
    if len(data) > MAX_SIZE:  # (it grew since)
        raise ProfileError([f"{path}: more than {MAX_SIZE >> 20} MiB; a profile is not"])
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ProfileError([f"{path}: cannot read: not UTF-8 ({exc.reason})"]) from None


def spec_for_start(name_or_path: str, environ: dict[str, str], name: str | None = None,
                   tty: bool = False, notices: list[str] | None = None) -> str:
    """The spec (JSON) `bblctl start` runs: the profile found and expanded with the caller's
    environment, renamed to `name`, its main command on a terminal made inside the sandbox
    with `tty`; its notices added to `notices`. Raises ProfileError."""
    if name is not None and not spec.NAME_PATTERN.match(name):
        raise ProfileError([f"--name {name!r}: use letters, digits, . _ -"])
    sandbox = load(find(name_or_path, environ), environ, notices=notices, name=name,
                   located=True)
    if name is not None:  # (a profile with a tree of its own: its layers keep their hostnames)
        sandbox.name = name
    main = spec.path_to(sandbox.layer, spec.main_layer_name(sandbox))[-1]
    main.command = msgspec.structs.replace(main.command, tty=tty)
    return msgspec.json.encode(sandbox).decode()


def _option_problems(options: Profile, path: str, text: str, numbering: dict) -> list[str]:
    """What the types cannot say, each problem with its line."""
    problems = []

    def say(where: str, message: str) -> None:
        problems.append(f"{path}:{line_of(text, where)}: {where.removeprefix('$.')}: {message}")

    def absolute(where: str, value: str) -> None:
        if not (value.startswith("/") or value == "~" or value.startswith("~/")):
            say(where, f"{value!r} must be an absolute path (or start with ~/)")
        elif ".." in value.split("/"):
            say(where, f"{value!r} must not contain '..'")

    if options.name is not None and not spec.NAME_PATTERN.match(options.name):
        say("$.name", f"{options.name!r} must match {spec.NAME_PATTERN.pattern}")
    if options.command is not None and (not options.command or not options.command[0]):
        say("$.command", "must name a program, e.g. [\"firefox\"]")
    if options.home != "tmpfs":
        absolute("$.home", options.home)
    for index, mount in _numbered(options.mounts, numbering.get("mounts")):
        absolute(f"$.mounts[{index}].src", mount.src)
        if mount.dest is not None:
            absolute(f"$.mounts[{index}].dest", mount.dest)
    for index, masked in enumerate(options.masks.paths):
        absolute(f"$.masks.paths[{index}]", masked)
    for index, server in _numbered(options.dns, numbering.get("dns")):
        if not re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", server):
            say(f"$.dns[{index}]", f"{server!r} is not an IP address")
    for name in [*options.env.pass_, *options.env.set]:
        if not spec.ENV_NAME_PATTERN.match(name):
            say("$.env", f"{name!r} is not a variable name")
    for where, message in dbus.problems(dbus.of(options.dbus), options.app_id):
        say(where, message)
    for where, message in net.problems(net.of(options.net)):
        say(where, message)
    for where, message in gui.problems(gui.of(options.gui), net.of(options.net).mode):
        say(where, message)
    for where, message in limits.problems(options.limits):
        say(where, message)
    return problems


def _check_bus_identities(top: spec.Layer, uid: int, path: str, text: str) -> None:
    """A layer handed a bus address (env.set) must run as the user's uid: the bus checks the
    uid its peer claims in EXTERNAL authentication against the one the kernel gives it
    (SO_PEERCRED, the real one), so a layer that is uid 0 (or any other uid) in its user
    namespace fails to connect ("Exhausted all available authentication mechanisms")."""
    problems = []

    def visit(layer: spec.Layer, parent_uid: int, bus: str | None, where: str) -> None:
        sets_uid = "user" in layer.namespaces and layer.uid is not None
        own_uid = layer.uid if sets_uid else parent_uid
        if layer.env.clear:
            bus = None
        bus = next((v for v in dbus.VARIABLE.values() if v in layer.env.set), bus)
        if bus and own_uid != uid and (layer.command or layer.companions):
            line = line_of(text, f"{where}.uid" if sets_uid else where)
            problems.append(f"{path}:{line}: layer {layer.name!r}: runs as uid "
                            f"{own_uid} with {bus} set, and a bus only lets in the uid it sees "
                            f"({uid}): give the layer uid = {uid}")
        for index, child in enumerate(layer.layers):
            visit(child, own_uid, bus, f"{where}.layers[{index}]")

    visit(top, uid, None, "$.layer")
    if problems:
        raise ProfileError(problems)


def _default_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".toml")


MAX_PROBLEMS = 50  # type problems reported from one profile


def _convert(raw: dict, kind, path: str, text: str):
    """`raw` as a `kind`; ProfileError with every type problem (_typed)."""
    value, problems = _typed(raw, kind, path, text)
    if problems:
        raise ProfileError(problems)
    return value


def _options(raw: dict, path: str, text: str) -> tuple[Profile, list[str], dict]:
    """The user options, every type problem in them, and the numbering of lists that lost
    elements. Each top-level key (and each element of a top-level list) is checked on its
    own, so that one problem hides no other; the options hold what has none, and
    numbering[key] the original index of each element a list kept."""
    problems, good, numbering = [], {}, {}
    for key, value in raw.items():
        parts = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        kept = []
        for index, part in parts:
            found = _typed({key: [part] if index is not None else part}, Profile, path, text,
                           (f"$.{key}[0]", f"$.{key}[{index}]"))[1]
            problems += found
            kept += [] if found else [index]
        if len(kept) == len(parts):
            good[key] = value
        elif parts[0][0] is not None:  # (a list: its good elements, for their own checks)
            good[key], numbering[key] = [value[index] for index in kept], kept
    return msgspec.convert(good, Profile), problems[:MAX_PROBLEMS], numbering


def _numbered(items: list, numbering: list[int] | None):
    """(index in the profile, item) of a list that may have lost elements (_options)."""
    return zip(numbering, items, strict=True) if numbering is not None else enumerate(items)


def _typed(raw: dict, kind, path: str, text: str, renamed: tuple[str, str] = ("", "")):
    """(`raw` as a `kind`, or None; its type problems as FILE:LINE: key: message). After a
    problem the key it names is left out and the rest tried again, until a problem names no
    key that can go (a missing key, a list's element) or none is left. `renamed`: a path
    prefix to report as another (a list's element checked alone)."""
    raw = copy.deepcopy(raw)
    problems, dropped = [], set()
    while len(problems) < MAX_PROBLEMS:
        try:
            return msgspec.convert(raw, kind), problems
        except msgspec.ValidationError as exc:
            message, found, where = str(exc).rpartition(" - at `")
            message, where = (message, where.rstrip("`")) if found else (str(exc), "$")
            missing = re.match(r"Object missing required field `([\w-]+)`", message)
            if missing and f"{where}.{missing.group(1)}" in dropped:
                break  # (we left it out, after saying what was wrong with it)
            unknown = re.match(r"Object contains unknown field `([\w-]+)`", message)
            if unknown:  # point at the key itself
                where = f"{where}.{unknown.group(1)}"
                message = "unknown key; see docs/profiles.md for the keys there are"
            shown = renamed[1] + where.removeprefix(renamed[0]) \
                if renamed[0] and where.startswith(renamed[0]) else where
            problems.append(f"{path}:{line_of(text, shown)}: "
                            f"{shown.removeprefix('$.') or 'top level'}: {message}")
            if missing or not _drop(raw, where):
                break
            dropped.add(where)
    return None, problems


def _drop(raw: dict, where: str) -> bool:
    """Leave out the table key msgspec's `$.a[1].b` names; False if it names none."""
    steps = re.findall(r"\.([\w-]+)|\[(\d+)\]", where)
    if not steps or not steps[-1][0]:
        return False
    container = raw
    for key, index in steps[:-1]:
        try:
            container = container[key] if key else container[int(index)]
        except (KeyError, IndexError, TypeError):
            return False
    if not isinstance(container, dict) or steps[-1][0] not in container:
        return False
    del container[steps[-1][0]]
    return True


def line_of(text: str, where: str) -> int:
    """The line of the TOML key msgspec's `$.a[1].b` names (best effort; 1 if unknown)."""
    steps = re.findall(r"\.([\w-]+)|\[(\d+)\]", where)
    lines = text.splitlines()
    table, counts, best = "", {}, 1
    wanted = ""
    for key, index in steps:
        wanted += f".{key}" if key else f"[{index}]"
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        header = re.match(r"^\[\[\s*([\w.-]+)\s*\]\]", stripped)
        if header:
            name = header.group(1)
            counts[name] = counts.get(name, -1) + 1
            table = f".{name}[{counts[name]}]"
        elif (header := re.match(r"^\[\s*([\w.-]+)\s*\]", stripped)):
            table = "." + header.group(1)
        else:
            key = re.match(r"^([\w-]+)\s*=", stripped)
            if key is None:
                continue
            path = f"{table}.{key.group(1)}"
            if wanted.startswith(path + "["):  # an element of an array: its own line
                return _element_line(lines, number, int(wanted[len(path) + 1:].split("]")[0]))
            if wanted == path or wanted.startswith(path + "."):
                return number
            continue
        if wanted == table or wanted.startswith(table + ".") or wanted.startswith(table + "["):
            best = number
    return best


def _element_line(lines: list[str], number: int, index: int) -> int:
    """The line where element `index` of the array assigned on line `number` begins (that
    line if it cannot tell): arrays written one element a line point at the element."""
    depth, count, quote, expecting = 0, -1, None, False
    for n in range(number - 1, len(lines)):
        line = lines[n]
        for ch in line[line.index("=") + 1:] if n == number - 1 else line:
            if quote:
                quote = None if ch == quote else quote
                continue
            if ch == "#":
                break  # (a comment, to the end of the line)
            if depth == 1 and expecting and not ch.isspace() and ch not in ",]":
                count, expecting = count + 1, False
                if count == index:
                    return n + 1
            if ch in "\"'":
                quote = ch
            elif ch in "[{":
                depth += 1
                expecting = expecting or depth == 1
            elif ch in "]}":
                depth -= 1
                if depth == 0:
                    return number
            elif ch == "," and depth == 1:
                expecting = True
    return number


# ---------------------------------------------------------------- the template


def expand(options: Profile, name: str, environ: dict[str, str], uid: int,
           gid: int, notices: list[tuple[str, str]] | None = None) -> spec.Sandbox:
    """BBL's default nested template, shaped by the user options. Raises dbus.DBusError when
    the host cannot give the D-Bus the options ask for; (key, notice) to `notices` for what
    the host lacks and was done without."""
    home = environ.get("HOME") or f"/home/{uid}"
    helpers = paths.runtime_dir(environ)  # (layer1 hides it under a tmpfs for the helpers)
    bus = dbus.parts(dbus.of(options.dbus), options.app_id, environ, uid, helpers)
    display = gui.parts(gui.of(options.gui), name, environ, uid, gid, helpers, _system_view(),
                        options.app_id)
    if display.notice and notices is not None:
        notices.append(("gui", display.notice))
    waits = [*bus.start_after, *display.start_after]  # (the app's layers, for the helpers)
    limited = limits.of(options.limits)
    rlimits = limited.rlimits
    layer4 = spec.Layer(name="layer4", namespaces=["user", "pid", "mount"], uid=uid, gid=gid,
                        seccomp=spec.Seccomp(policy="default"), rlimits=rlimits,
                        command=spec.Command(argv=list(options.command or spec.INTERACTIVE_SHELL),
                                             new_session=False,
                                             args_replace=options.command is None),
                        start_after=waits, start_timeout=HELPERS_TIMEOUT)
    untrusted = [list(c) for c in options.untrusted_companions]
    if display.session:  # (a window manager or desktop session on the nested display)
        untrusted.insert(0, display.session)
    layer4a = spec.Layer(name="layer4a", namespaces=["user", "pid", "mount"], uid=uid, gid=gid,
                         seccomp=spec.Seccomp(policy="default"), rlimits=rlimits,
                         companions=untrusted, start_after=waits if untrusted else [],
                         start_timeout=HELPERS_TIMEOUT)
    namespaces = ["mount", "pid", "ipc", "uts", "cgroup"]
    network = net.of(options.net)
    if network.mode != "host":
        namespaces.append("net")
    layer3 = spec.Layer(name="layer3", namespaces=namespaces, hostname=name[:64],
                        new_root=True, fs=_layer3_fs(options, home, environ, uid, bus, display),
                        env=_layer3_env(options, home, environ, uid, bus, display), cwd=home,
                        pids_limit=limited.pids, resources=limited.resources,
                        layers=[layer4, layer4a, *([msgspec.structs.replace(
                            display.server, rlimits=rlimits)] if display.server else [])],
                        network=net.network(network, options.dns, environ))
    layer2h = spec.Layer(name="layer2h", namespaces=["mount"], layers=[layer3])
    # (the proxy starts as soon as layer2a is built: the app's layers wait for it)
    helper_commands = [spec.Command(argv=argv, early=True) for argv in (bus.companion,
                                                                         display.companion) if argv]
    layer2a = spec.Layer(name="layer2a", namespaces=["user", "pid", "mount"], uid=uid, gid=gid,
                         companions=[*helper_commands, *(list(c) for c in options.companions)])
    masks = [spec.Mask(path=_home_path(p, home), origin=f"masks.paths[{index}]")
             for index, p in enumerate(options.masks.paths)]
    layer2 = spec.Layer(name="layer2", namespaces=["mount"], fs=masks,
                        layers=[layer2a, *([display.layer] if display.layer else []), layer2h])
    # the helpers' sockets live in a tmpfs of the instance's own, over BBL's runtime
    # directory (which exists while bbld runs): gone with the instance, and bbld's socket and
    # the other instances' control sockets out of sight of every layer
    helper_dir = [spec.Tmpfs(dest=helpers, mode=0o700, origin="helpers"),
                  *(spec.Tmpfs(dest=d, mode=0o700, origin="gui") for d in display.helper_dirs)] \
        if bus.helpers or display.helpers else []
    layer1 = spec.Layer(name="layer1", namespaces=["user", "pid", "mount"], uid=0, gid=0,
                        fs=helper_dir, layers=[layer2])
    return spec.Sandbox(name=name, main="layer4", layer=layer1,
                        single_instance=options.instance == "single",
                        send_args=options.send_args or _default_send_args(options))


def _default_send_args(options: Profile) -> list[str]:
    """How new arguments reach the running app when the profile does not say: its whole
    command again with them (so that `sh -c SCRIPT NAME` and commands with arguments of
    their own get them where they expect), or, for the interactive-shell default, the
    arguments as a command of their own."""
    return [*options.command, "{args}"] if options.command else ["{args}"]


def _home_path(path: str, home: str) -> str:
    return home + path[1:] if path == "~" or path.startswith("~/") else path


def _layer3_fs(options: Profile, home: str, environ: dict[str, str], uid: int,
               bus: dbus.Parts, display: gui.Parts) -> list:
    fs = [*_system_view(), spec.Proc(dest="/proc")]
    host_dev = options.hardware == "all"
    if host_dev:  # mount points can only be the host's own (BBL never creates host files)
        fs += [spec.RoBind(src="/dev", dest="/dev"), spec.RoBind(src="/sys", dest="/sys")]
        if os.path.isdir("/dev/shm"):
            fs.append(spec.Tmpfs(dest="/dev/shm", mode=0o1777))
    else:
        fs.append(spec.Dev(dest="/dev"))
        if options.hardware == "gpu":
            fs.append(spec.DevBind(src="/dev/dri", dest="/dev/dri", try_=True))
    if not host_dev or os.path.isdir("/dev/mqueue"):
        fs.append(spec.Mqueue(dest="/dev/mqueue"))
    fs += [spec.Tmpfs(dest="/tmp", mode=0o1777),
           spec.Tmpfs(dest="/run", mode=0o755), spec.Dir(dest=f"/run/user/{uid}", mode=0o700),
           spec.Tmpfs(dest="/var", mode=0o755), spec.Dir(dest="/var/tmp", mode=0o1777)]
    if options.opt:
        fs.append(spec.RoBind(src="/opt", dest="/opt", try_=True))
    if options.home == "tmpfs":
        fs.append(spec.Tmpfs(dest=home, mode=0o700, origin="home"))
    else:
        fs.append(spec.Bind(src=_home_path(options.home, home), dest=home, origin="home"))
    for index, mount in enumerate(options.mounts):  # (errors name the profile's key)
        src = _home_path(mount.src, home)
        if mount.type == "appimage":
            fs += [msgspec.structs.replace(op, origin=f"mounts[{index}]")
                   for op in _appimage(src, mount.dest and _home_path(mount.dest, home))]
            continue
        dest = _home_path(mount.dest, home) if mount.dest else src
        fs.append((spec.Bind if mount.type == "bind" else spec.RoBind)(
            src=src, dest=dest, origin=f"mounts[{index}]"))
    fs += _masks(options)
    servers = net.nameservers_to_write(net.of(options.net), options.dns, environ)
    if servers:
        resolv = "".join(f"nameserver {server}\n" for server in servers)
        fs.append(spec.RoBindData(dest="/etc/resolv.conf", content=resolv, mode=0o444))
    fs += _desktop(options, environ, uid)
    fs += bus.fs
    if display.helpers and not bus.helpers:  # (the helpers' directory, as D-Bus shows it)
        fs.append(spec.RoBind(src=paths.runtime_dir(environ), dest=dbus.HELPERS, origin="gui"))
    fs += display.fs
    return fs


def _system_view() -> list:
    """/usr and /etc read-only, and the links of a merged /usr (/bin -> usr/bin, ...)."""
    fs: list = [spec.RoBind(src="/usr", dest="/usr"), spec.RoBind(src="/etc", dest="/etc")]
    for link in SYSTEM_LINKS:
        if os.path.islink(f"/{link}"):
            fs.append(spec.Symlink(target_path=os.readlink(f"/{link}"), dest=f"/{link}"))
    return fs


def appimage_name(src: str) -> str:
    """`~/Apps/Some App-1.2.AppImage` -> `Some_App-1.2`."""
    stem = re.sub(r"\.appimage$", "", os.path.basename(src), flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "app"


def _appimage(src: str, dest: str | None) -> list:
    """The AppImage's squashfs at /sbx/apps/NAME and a launcher /sbx/apps/run_NAME that
    sets what an AppImage's own runtime would (APPDIR, APPIMAGE)."""
    name = appimage_name(src)
    mounted = dest or f"/sbx/apps/{name}"
    q = shlex.quote
    launcher = (f'#!/bin/sh\nAPPDIR={q(mounted)} APPIMAGE={q(src)} ARGV0={q(name)} '
                f'exec {q(mounted + "/AppRun")} "$@"\n')
    return [spec.Squashfs(src=src, dest=mounted),
            spec.File(dest=f"/sbx/apps/run_{name}", content=launcher, mode=0o555)]


def _masks(options: Profile) -> list:
    fs: list = []
    if options.masks.machine_id:
        fs.append(spec.RoBindData(dest="/etc/machine-id", content="0" * 32 + "\n", mode=0o444))
    if options.masks.os_release:
        # /etc/os-release is usually a link to /usr/lib/os-release: cover the file once
        for path in sorted({os.path.realpath(p) for p in ("/etc/os-release",
                                                          "/usr/lib/os-release")}):
            if os.path.isfile(path):
                fs.append(spec.RoBindData(dest=path, content="ID=linux\nNAME=Linux\n",
                                          mode=0o444))
    if options.masks.openers:
        seen = set()
        for name in OPENERS:
            for directory in ("/usr/bin", "/usr/local/bin", "/usr/games"):
                candidate = os.path.join(directory, name)
                if not os.path.lexists(candidate):  # most are not there: one lstat, not a
                    continue  # realpath walk (dozens of them, on every start)
                path = os.path.realpath(candidate)
                if os.path.isfile(path) and path not in seen and path.startswith("/usr/"):
                    seen.add(path)
                    fs.append(spec.Mask(path=path))
    return fs


def _desktop(options: Profile, environ: dict[str, str], uid: int) -> list:
    """host-x11: the display's socket and a copy of the user's cookie for it;
    host-x11-untrusted: the socket and a cookie the display made untrusted (the other modes:
    bbld.gui.parts)."""
    mode = gui.of(options.gui).mode
    number = gui.host_display(environ)
    if mode not in ("host-x11", "host-x11-untrusted") or number is None:
        return []
    socket = f"{gui.SOCKETS}/X{number}"
    fs: list = [spec.RoBind(src=socket, dest=socket, try_=True, origin="gui")]
    cookie = gui.untrusted_cookie(environ) if mode == "host-x11-untrusted" \
        else gui.host_cookie(environ)
    if cookie:
        fs.append(spec.RoBindData(dest=gui.AUTHORITY, data=cookie, mode=0o400, origin="gui"))
    return fs


def _layer3_env(options: Profile, home: str, environ: dict[str, str], uid: int,
                bus: dbus.Parts, display: gui.Parts) -> spec.Env:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp",
           "USER": environ.get("USER", ""), "LOGNAME": environ.get("LOGNAME", ""),
           "SHELL": "/bin/sh", "XDG_RUNTIME_DIR": f"/run/user/{uid}"}
    for variable in options.env.pass_:
        if variable in environ:
            env[variable] = environ[variable]
    if gui.of(options.gui).mode in ("host-x11", "host-x11-untrusted") and environ.get("DISPLAY"):
        env["DISPLAY"] = environ["DISPLAY"]
        env["XAUTHORITY"] = "/run/bbl/Xauthority"
    env.update(bus.env)
    env.update(display.env)
    if gui.of(options.gui).mode == "wayland":  # (toolkits pick Wayland: there is no X)
        env.update({"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland",
                    "GDK_BACKEND": "wayland", "QT_QPA_PLATFORM": "wayland"})
    env.update(options.env.set)
    return spec.Env(clear=True, set={k: v for k, v in env.items() if v != ""})
