"""The sandbox spec: what a sandbox is, as a tree of layers. Pure data, no I/O, no kernel calls.

A profile (TOML) and a bubblewrap command line are front ends that both produce a `Sandbox`.
`decode()` turns JSON/TOML text into a `Sandbox`; `check()` finds every rule it breaks and
names the layer, the filesystem operation index and the field of each problem.
"""

from __future__ import annotations

import posixpath
import re
from typing import Literal, NamedTuple, get_args

import msgspec
from msgspec import Struct, field

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENV_NAME_PATTERN = re.compile(r"^[^=\0]+$")

Namespace = Literal["user", "mount", "pid", "ipc", "uts", "net", "cgroup", "time"]
NAMESPACES = get_args(Namespace)  # (bbld.engine.namespaces has a row for each)

CAPABILITIES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)


def capability_number(name: str) -> int:
    """'CAP_SYS_ADMIN', 'sys_admin' -> 21. Raises ValueError for unknown names."""
    key = name.lower().removeprefix("cap_")
    return CAPABILITIES.index(key)


def _mode(value: int | str) -> int:
    """Modes are ints (TOML 0o755) or octal strings ("0755", JSON has no octal literal)."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f"mode {value!r} is not an octal number like \"0755\"") from None
    if not 0 <= value <= 0o7777:
        raise ValueError(f"mode {value:o} is out of range (0 to 7777 octal)")
    return value


# ---------------------------------------------------------------- filesystem operations
# Sources are paths as the parent layer sees them; destinations are paths in this layer's
# view (inside its new root when it has one). Operations run in the order given.


class FsOp(Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    # Where the operation came from, for messages: a front end's own name for it (a
    # profile's "mounts[0]"); errors say "fs[N]" without it.
    origin: str | None = None
    # the mode of the missing parent directories the operation creates (default 0755)
    parents_mode: int | str | None = None

    def __post_init__(self):
        if self.parents_mode is not None:
            self.parents_mode = _mode(self.parents_mode)
        if getattr(self, "mode", None) is not None:
            self.mode = _mode(self.mode)

    @property
    def target(self) -> str:
        return getattr(self, "dest", None) or self.path

    @property
    def kind(self) -> str:
        return type(self).__struct_config__.tag


class _Bind(FsOp, kw_only=True):
    src: str
    dest: str
    try_: bool = field(default=False, name="try")  # skip silently if src does not exist


class Bind(_Bind, tag="bind"):
    """Recursive bind, nosuid+nodev on every submount."""


class RoBind(_Bind, tag="ro-bind"):
    """Recursive bind, read-only+nosuid+nodev on every submount."""


class DevBind(_Bind, tag="dev-bind"):
    """Recursive bind that keeps device nodes usable (nosuid only)."""


class BindFd(FsOp, tag="bind-fd", kw_only=True):
    fd: int  # an fd open in the engine's caller: a directory or an O_PATH fd
    dest: str


class RoBindFd(BindFd, tag="ro-bind-fd"):
    pass


class RemountRo(FsOp, tag="remount-ro", kw_only=True):
    dest: str  # must be a mount point; made read-only with everything mounted below it


class Tmpfs(FsOp, tag="tmpfs", kw_only=True):
    dest: str
    mode: int | str = 0o755
    size: int | None = None  # bytes


class Dir(FsOp, tag="dir", kw_only=True):
    dest: str
    mode: int | str = 0o755


class Symlink(FsOp, tag="symlink", kw_only=True):
    target_path: str = field(name="target")  # the link's literal contents
    dest: str


class _Data(FsOp, kw_only=True):
    dest: str
    content: str | None = None
    data: bytes | None = None  # raw bytes (base64 in JSON and TOML), e.g. a binary cookie
    fd: int | None = None  # read to EOF by the engine before the sandbox starts
    mode: int | str = 0o666


class File(_Data, tag="file"):
    """A regular file created in the new root with the given content."""


class BindData(_Data, tag="bind-data"):
    mode: int | str = 0o600


class RoBindData(_Data, tag="ro-bind-data"):
    mode: int | str = 0o600


class Chmod(FsOp, tag="chmod", kw_only=True):
    path: str
    mode: int | str


class Proc(FsOp, tag="proc", kw_only=True):
    dest: str


class Dev(FsOp, tag="dev", kw_only=True):
    """A minimal /dev: tmpfs 0755, null zero full random urandom tty, its own devpts, shm."""
    dest: str
    shm_tmpfs: bool = True  # shm is a tmpfs 1777 of its own; else a directory 0755 (bwrap's)


class Devpts(FsOp, tag="devpts", kw_only=True):
    dest: str


class Mqueue(FsOp, tag="mqueue", kw_only=True):
    dest: str


class Overlay(FsOp, tag="overlay", kw_only=True):
    lower: list[str]  # first entry is the top-most lower layer
    upper: str
    work: str
    dest: str


class TmpOverlay(FsOp, tag="tmp-overlay", kw_only=True):
    """Overlay whose writes go to an invisible tmpfs and are discarded at the end."""
    lower: list[str]
    dest: str


class RoOverlay(FsOp, tag="ro-overlay", kw_only=True):
    lower: list[str]
    dest: str


class Squashfs(FsOp, tag="squashfs", kw_only=True):
    """A squashfs image, or an AppImage, mounted read-only (FUSE, served by squashfuse)."""
    src: str
    dest: str
    offset: int | None = None  # bytes before the image; default: found (0, or an AppImage's)


class Mask(FsOp, tag="mask", kw_only=True):
    """Make a path empty and unreadable (skipped when it does not exist)."""
    path: str


AnyFsOp = (
    Bind | RoBind | DevBind | BindFd | RoBindFd | RemountRo | Tmpfs | Dir | Symlink | File
    | BindData | RoBindData | Chmod | Proc | Dev | Devpts | Mqueue | Overlay | TmpOverlay
    | RoOverlay | Mask | Squashfs
)

# ---------------------------------------------------------------- layers


class IdMap(Struct, forbid_unknown_fields=True):
    inside: int
    outside: int
    count: int = 1


class Env(Struct, forbid_unknown_fields=True):
    """Applied on top of the parent layer's environment: clear, then unset, then set."""
    clear: bool = False
    unset: list[str] = []
    set: dict[str, str] = {}


class Command(Struct, forbid_unknown_fields=True):
    argv: list[str]
    argv0: str | None = None  # argv[0] given to the program (the file run is still argv[0])
    cwd: str | None = None
    new_session: bool = True  # setsid(): the command never holds the caller's terminal
    pass_fds: list[int] = []  # fds of the engine's caller kept open; all others are closed
    stdin: Literal["inherit", "null"] | None = None  # default: main inherits, companions null
    # "null": stdout and stderr to /dev/null (the layer's own), for a helper whose chatter
    # would land in the app's terminal
    output: Literal["inherit", "null"] = "inherit"
    # a new pty from the layer's own devpts as stdio and controlling terminal (in a new
    # session); the main command's pty master goes to the engine's caller
    tty: bool = False
    # the main command as a default only (the template's interactive shell): arguments given
    # at the start replace argv instead of extending it
    args_replace: bool = False
    # a companion that starts as soon as its layer is built, not at the instance-wide go: a
    # helper other layers wait for (start_after); ended with the rest if the start fails
    early: bool = False


class Resources(Struct, forbid_unknown_fields=True, kw_only=True):
    """Limits a cgroup of the layer's own sets on the layer and every layer below it
    (bbld.engine.cgroups; the controller each needs must be delegated)."""
    memory: int | None = None  # bytes: memory.max (past it, the kernel's OOM killer)
    memory_high: int | None = None  # bytes: memory.high (past it, reclaim and throttling)
    swap: int | None = None  # bytes: memory.swap.max (default: memory's, when memory is set)
    cpu: float | None = None  # CPUs' worth of time: cpu.max (0.5: 50 ms in every 100 ms)
    io_weight: int | None = None  # 1..10000 (default 100): io.weight


class Seccomp(Struct, forbid_unknown_fields=True):
    policy: str | None = None  # a named built-in policy (bbld.engine.seccomp.POLICIES)
    extend: list[str] = []  # groups added to the policy (bbld.engine.seccomp.ALL_GROUPS)
    relax: list[str] = []  # groups taken out of it, e.g. "ptrace" for a debugger
    programs: list[bytes] = []  # compiled classic-BPF programs (base64 in JSON), in order


class Join(Struct, forbid_unknown_fields=True):
    """Existing namespaces the top layer enters (fds of the engine's caller) before it creates
    its own: bubblewrap's --userns and --pidns."""
    user: int | None = None  # the layer runs in this user namespace instead of a new one
    pid: int | None = None  # the layer's processes are born in this pid namespace


class PortForward(Struct, forbid_unknown_fields=True, kw_only=True):
    """Connections to a host port go to a port inside (pasta's -t/-u)."""
    protocol: Literal["tcp", "udp"] = "tcp"
    host_address: str = "127.0.0.1"  # where the port is bound on the host
    host_port: int
    port: int  # inside


class HostPort(Struct, forbid_unknown_fields=True, kw_only=True):
    """A port of the host's loopback the layer reaches at its own 127.0.0.1 (pasta's -T/-U)."""
    protocol: Literal["tcp", "udp"] = "tcp"
    port: int


class EgressRule(Struct, forbid_unknown_fields=True, kw_only=True):
    """Traffic leaving the layer's network namespace: to an address or prefix ("any": every
    address), optionally one protocol and a port range (first, last)."""
    to: str
    protocol: Literal["tcp", "udp"] | None = None
    ports: tuple[int, int] | None = None  # needs a protocol


class Network(Struct, forbid_unknown_fields=True, kw_only=True):
    """A layer's own network namespace, connected and fenced by its engine's caller before
    any command runs (bbld.engine.network); nothing inside can undo it unless it holds
    CAP_NET_ADMIN over the namespace's user namespace."""
    nat: bool = False  # reach the host's networks through user-mode NAT
    # which program: pasta (the host's address and routes, host ports one by one), or
    # slirp4netns (10.0.2.100 behind 10.0.2.2, its own DNS forwarder at 10.0.2.3)
    nat_with: Literal["pasta", "slirp4netns"] = "pasta"
    forward: list[PortForward] = []
    host_ports: list[HostPort] = []
    mtu: int = 1500  # of the NAT's interface (a 64 KiB one defeats shaping's bursts)
    # name servers the layer may always reach on port 53 (unless `deny` says otherwise), even
    # where deny_host or deny_local would reject them: a LAN's or the host's resolver
    resolvers: list[str] = []
    rate: int | None = None  # bits per second, each way (download and upload)
    delay_ms: int | None = None  # added each way (netem; not every kernel has it)
    deny: list[EgressRule] = []  # rejected first
    allow: list[EgressRule] = []  # then accepted; when given, everything else is rejected
    deny_host: bool = True  # the host's own addresses (its services, reached through the NAT)
    deny_local: bool = False  # private, shared and link-local ranges (the LAN)


class Layer(Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    namespaces: list[Namespace] = []
    join: Join | None = None  # top layer only
    uid: int | None = None  # uid inside; default: the parent's uid (needs a user namespace)
    gid: int | None = None
    uid_map: list[IdMap] | None = None  # default: one line, uid inside -> parent's uid
    gid_map: list[IdMap] | None = None
    hostname: str | None = None
    new_root: bool = False  # build a new root on a private tmpfs and pivot into it
    root_readonly: bool = True  # the new root's own tmpfs is made read-only once built
    fs: list[AnyFsOp] = []
    env: Env = field(default_factory=Env)
    cwd: str | None = None  # commands' cwd; default: the parent's, else $HOME, else /
    caps: list[str] = []  # capabilities the layer's commands keep (default none)
    # caps also go into the inheritable and ambient sets, so that a command whose uid is not
    # 0 keeps them across execve; False: only a uid-0 command has them (execve's own rules,
    # what bubblewrap does for root without --cap-add/--cap-drop)
    ambient_caps: bool = True
    seccomp: Seccomp | None = None
    command: Command | list[str] | None = None
    companions: list[Command | list[str]] = []
    start_after: list[str] = []  # unix socket paths (parent's view) that must accept first
    start_timeout: float = 30.0
    rlimits: dict[str, int] = {}  # for its commands: "nproc" = 512 sets soft and hard limit
    pids_limit: int | None = None  # processes of the layer and all below it (a cgroup's pids.max)
    resources: Resources | None = None  # memory, CPU and IO of the layer and all below it
    network: Network | None = None  # with "net" in namespaces: NAT, shaping, egress rules
    lock_files: list[str] = []  # read-locked (fcntl) by the supervisor while the layer lives
    # "deny": nothing in this layer or below creates user namespaces any more;
    # "assert-denied": commands refuse to start if they could create one
    user_namespaces: Literal["allow", "deny", "assert-denied"] = "allow"
    command_replaces_supervisor: bool = False  # the command is exec'd in the supervisor itself
    layers: list[Layer] = []

    def __post_init__(self):
        if isinstance(self.command, list):
            self.command = Command(argv=self.command)
        self.companions = [Command(argv=c) if isinstance(c, list) else c for c in self.companions]


class Sandbox(Struct, forbid_unknown_fields=True, kw_only=True):
    name: str = "sandbox"
    main: str | None = None  # layer whose command is the main one; default: the first with one
    # a second start with the same name hands its arguments to the running instance instead
    single_instance: bool = False
    # how the instance takes arguments sent to it (bblctl send-args, a second single-instance
    # start): this command runs in the main layer, an element "{args}" standing for them;
    # default: the main command's program with the new arguments
    send_args: list[str] | None = None
    die_with_parent: bool = False  # layer 1 gets SIGKILL when the engine's caller dies
    info_fd: int | None = None  # bubblewrap's --info-fd document is written here, then closed
    json_status_fd: int | None = None  # bubblewrap's --json-status-fd lines
    block_fd: int | None = None  # no command starts before a byte (or EOF) arrives here
    sync_fd: int | None = None  # held open by the engine's caller until the instance ends
    # layer 1's uid/gid maps are written by someone else (newuidmap): the engine writes the
    # info_fd document, then waits for a byte (or EOF) here before layer 1 goes on
    userns_block_fd: int | None = None
    layer: Layer


# ---------------------------------------------------------------- walking


def walk(layer: Layer, parent: Layer | None = None):
    """Yield (layer, parent) depth-first, parents before children."""
    yield layer, parent
    for child in layer.layers:
        yield from walk(child, layer)


def main_layer_name(sandbox: Sandbox) -> str | None:
    if sandbox.main is not None:
        return sandbox.main
    for layer, _ in walk(sandbox.layer):
        if layer.command is not None:
            return layer.name
    return None


def path_to(root: Layer, name: str) -> list[Layer]:
    """The layers from `root` down to the layer called `name` (empty if absent)."""
    if root.name == name:
        return [root]
    for child in root.layers:
        found = path_to(child, name)
        if found:
            return [root, *found]
    return []


def send_args_argv(sandbox: Sandbox, args: list[str]) -> list[str]:
    """The command that hands `args` to a running instance of `sandbox`."""
    if sandbox.send_args is None:
        main = path_to(sandbox.layer, main_layer_name(sandbox))[-1]
        return [main.command.argv[0], *args]
    argv = []
    for element in sandbox.send_args:
        argv += args if element == "{args}" else [element]
    return argv


def caller_fds(sandbox: Sandbox) -> set[int]:
    """Every fd of the engine's caller the spec names by number."""
    join = sandbox.layer.join or Join()
    numbers = {sandbox.info_fd, sandbox.json_status_fd, sandbox.block_fd, sandbox.sync_fd,
               sandbox.userns_block_fd, join.user, join.pid}
    for layer, _ in walk(sandbox.layer):
        numbers.update(getattr(op, "fd", None) for op in layer.fs)
        commands = ([layer.command] if layer.command else []) + list(layer.companions)
        numbers.update(fd for command in commands for fd in command.pass_fds)
    numbers.discard(None)
    return numbers


# ---------------------------------------------------------------- decoding


class SpecError(ValueError):
    """One or more problems with a spec; each line names where."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def decode(text: str | bytes, fmt: Literal["json", "toml"], origin: str = "spec") -> Sandbox:
    """Parse and type-check a spec. Raises SpecError naming the layer, op index and field."""
    try:
        raw = msgspec.toml.decode(text) if fmt == "toml" else msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise SpecError([f"{origin}: not valid {fmt.upper()}: {exc}"]) from None
    try:
        return msgspec.convert(raw, Sandbox)
    except msgspec.ValidationError as exc:
        raise SpecError([f"{origin}: {_locate(raw, str(exc))}"]) from None


def _locate(raw, message: str) -> str:
    """Rewrite msgspec's `$.layer.layers[0].fs[2].src` into a layer name and a field path."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return message
    node, layer_name, rest, last_key = raw, None, "", None
    for key, index in re.findall(r"\.([\w-]+)|\[(\d+)\]", where.rstrip("`")):
        try:
            node = node[key or int(index)]
        except (KeyError, IndexError, TypeError):
            node = None
        rest += f".{key}" if key else f"[{index}]"
        entering_layer = key == "layer" or (index and last_key == "layers")
        if entering_layer and isinstance(node, dict) and isinstance(node.get("name"), str):
            layer_name, rest = node["name"], ""
        last_key = key or last_key
    where = [f"layer '{layer_name}'"] if layer_name else []
    if rest or not layer_name:
        where.append(rest.lstrip(".") or "top level")
    return f"{': '.join(where)}: {text}"


# ---------------------------------------------------------------- rules


# The named seccomp policies the engine has (bbld.engine.seccomp.POLICIES; a test keeps the
# two in step), so that front ends check specs without importing the engine.
# An interactive shell, whatever the layer has: the default command of the `default` profile
# and of `bblctl attach`.
INTERACTIVE_SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null && exec bash -i; exec sh -i"]

RLIMITS = ("as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice",
           "nofile", "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")
SECCOMP_POLICIES = ("default", "no-terminal-injection")
SECCOMP_GROUPS = ("keyring", "kernel-modules", "kexec", "kernel-tracing", "userfaultfd",
                  "file-handles", "mount", "ptrace", "namespace-join", "terminal-injection",
                  "user-namespaces", "personality")


def check(sandbox: Sandbox, caller_uid: int | None = None, caller_gid: int | None = None,
          known_policies=SECCOMP_POLICIES) -> None:
    """Raise SpecError listing every rule the spec breaks (nothing when it is sound)."""
    problems: list[str] = []
    seen: set[str] = set()
    if not NAME_PATTERN.match(sandbox.name):
        problems.append(f"name: {sandbox.name!r} must match {NAME_PATTERN.pattern}")
    caller = Ids(caller_uid, caller_gid, caller_uid == 0 and caller_gid == 0)
    _check_tree(sandbox.layer, caller, problems, seen, known_policies,
                maps_unknown=sandbox.userns_block_fd is not None)
    if sandbox.userns_block_fd is not None:
        if "user" not in sandbox.layer.namespaces:
            problems.append("userns_block_fd: the top layer must create a user namespace")
        if sandbox.info_fd is None:
            problems.append("userns_block_fd: needs info_fd (the map writer learns the pid there)")
        if sandbox.layer.user_namespaces == "deny":
            problems.append("userns_block_fd: cannot be combined with user_namespaces = "
                            "\"deny\" (the limit is set with maps the engine did not write)")
    main = main_layer_name(sandbox)
    if main is None:
        problems.append("main: no layer has a command; give one layer a `command`")
    elif main not in seen:
        problems.append(f"main: names layer {main!r}, which does not exist")
    elif not path_to(sandbox.layer, main)[-1].command:
        problems.append(f"main: layer {main!r} has no command")
    if sandbox.send_args is not None and (not sandbox.send_args or not sandbox.send_args[0]):
        problems.append("send_args: must name a program, e.g. [\"app\", \"--remote\", "
                        "\"{args}\"]")
    if problems:
        raise SpecError(problems)


def _reporter(problems: list[str], layer: str, op: str | None = None):
    def say(fieldname: str, message: str):
        where = f"layer '{layer}': " + (f"{op}: " if op else "")
        problems.append(f"{where}{fieldname}: {message}")
    return say


class Ids(NamedTuple):
    """Identity inside a layer; None where only known at run time."""
    uid: int | None
    gid: int | None
    root_mapped: bool | None  # are uid 0 and gid 0 mapped in the layer's user namespace?


def _check_tree(layer: Layer, parent: Ids, problems, seen, known_policies,
                maps_unknown: bool = False) -> None:
    say = _reporter(problems, layer.name)
    if layer.name in seen:
        say("name", "is used by another layer; layer names must be unique")
    seen.add(layer.name)
    if not NAME_PATTERN.match(layer.name):
        say("name", f"must match {NAME_PATTERN.pattern}")
    ids = _layer_ids(layer, parent, say)
    if maps_unknown:  # someone else writes the maps (userns_block_fd)
        ids = Ids(ids.uid, ids.gid, None)
    if layer.join is not None and len(seen) > 1:  # the top layer is the first one seen
        say("join", "only the top layer can join existing namespaces")
    if layer.join is not None and layer.join.pid is not None and "pid" in layer.namespaces:
        say("join.pid", "a new pid namespace under a joined one must be made by a process "
            "born in it: put \"pid\" in a sub-layer's namespaces")
    _check_layer(layer, say, known_policies)
    for index, op in enumerate(layer.fs):
        _check_op(layer, index, op, ids, _reporter(problems, layer.name,
                                                   f"fs[{index}] ({op.kind})"))
    for child in layer.layers:
        _check_tree(child, ids, problems, seen, known_policies)


def _layer_ids(layer: Layer, parent: Ids, say) -> Ids:
    joins_user = layer.join is not None and layer.join.user is not None
    if joins_user and "user" in layer.namespaces:
        say("join.user", "joins a user namespace, so \"user\" cannot be in namespaces too")
    if "user" not in layer.namespaces:
        for name in ("uid_map", "gid_map") if joins_user else ("uid", "gid", "uid_map", "gid_map"):
            if getattr(layer, name) is not None:
                say(name, "needs a user namespace; add \"user\" to namespaces")
        if joins_user:  # whatever that namespace maps: known only at run time
            return Ids(layer.uid, layer.gid, None)
        return parent
    uid = layer.uid if layer.uid is not None else parent.uid
    gid = layer.gid if layer.gid is not None else parent.gid
    root_mapped = True
    for name, inside, mapping in (("uid_map", uid, layer.uid_map), ("gid_map", gid, layer.gid_map)):
        if mapping is None:  # one line: the layer's id -> the parent's
            root_mapped = root_mapped and (inside == 0 if inside is not None else None)
            continue
        if not mapping:
            say(name, "must not be empty")
        elif inside is not None and not any(m.inside <= inside < m.inside + m.count
                                            for m in mapping):
            say(name, f"does not map the layer's own id {inside}")
        if any(m.count < 1 or m.inside < 0 or m.outside < 0 for m in mapping):
            say(name, "ids must be >= 0 and count >= 1")
        root_mapped = root_mapped and any(m.inside == 0 for m in mapping)
    return Ids(uid, gid, root_mapped)


def needs_supervisor(layer: Layer) -> list[str]:
    """The fields of `layer` that need its supervisor beside the command (which
    command_replaces_supervisor, and the engine's own replacement, rule out)."""
    return [name for name, value in (("companions", layer.companions), ("layers", layer.layers),
                                     ("lock_files", layer.lock_files)) if value]


def _check_layer(layer: Layer, say, known_policies) -> None:
    ns = layer.namespaces
    if len(set(ns)) != len(ns):
        say("namespaces", "lists a namespace twice")
    if "pid" in ns and "mount" not in ns:
        say("namespaces", "\"pid\" needs \"mount\" too (the layer mounts its own /proc)")
    if (layer.new_root or layer.fs) and "mount" not in ns:
        say("new_root" if layer.new_root else "fs", "needs a mount namespace; add \"mount\"")
    if layer.hostname is not None:
        if "uts" not in ns:
            say("hostname", "needs a uts namespace; add \"uts\" to namespaces")
        if not 0 < len(layer.hostname) <= 64 or "\0" in layer.hostname:
            say("hostname", "must be 1 to 64 characters")
    for index, name in enumerate(layer.caps):
        try:
            capability_number(name)
        except ValueError:
            say(f"caps[{index}]", f"unknown capability {name!r}")
    if layer.seccomp and layer.seccomp.policy is not None \
            and layer.seccomp.policy not in known_policies:
        say("seccomp.policy", f"unknown policy {layer.seccomp.policy!r}; known: "
            + ", ".join(sorted(known_policies)))
    for key in ("extend", "relax"):
        for index, group in enumerate(getattr(layer.seccomp, key) if layer.seccomp else []):
            if group not in SECCOMP_GROUPS:
                say(f"seccomp.{key}[{index}]", f"unknown group {group!r}; known: "
                    + ", ".join(SECCOMP_GROUPS))
    if layer.seccomp and (layer.seccomp.extend or layer.seccomp.relax) \
            and layer.seccomp.policy is None:
        say("seccomp", "extend and relax change a named policy; give `policy` too")
    for index, program in enumerate(layer.seccomp.programs if layer.seccomp else []):
        if not program or len(program) % 8:
            say(f"seccomp.programs[{index}]", "a BPF program is a non-empty multiple of 8 bytes")
    if layer.cwd is not None and not layer.cwd.startswith("/"):
        say("cwd", "must be an absolute path")
    for key in layer.env.set:
        if not ENV_NAME_PATTERN.match(key):
            say("env.set", f"{key!r} is not a valid variable name")
    for index, path in enumerate(layer.start_after):
        if not path.startswith("/"):
            say(f"start_after[{index}]", "must be an absolute socket path")
    for name, value in layer.rlimits.items():
        if name not in RLIMITS:
            say("rlimits", f"unknown limit {name!r}; known: {', '.join(RLIMITS)}")
        elif value < 0:
            say(f"rlimits.{name}", "must be >= 0")
    if layer.pids_limit is not None and layer.pids_limit < 1:
        say("pids_limit", "must be >= 1")
    if layer.resources is not None:
        _check_resources(layer.resources, say)
    for index, path in enumerate(layer.lock_files):
        _abs_path(say, f"lock_files[{index}]", path)
    if layer.user_namespaces == "deny":
        if "user" not in ns:
            say("user_namespaces", "\"deny\" sets the limit of the layer's own user namespace; "
                "add \"user\" to namespaces")
        if "sys_resource" in {n.lower().removeprefix("cap_") for n in layer.caps}:
            say("user_namespaces", "\"deny\" cannot hold with cap sys_resource kept: it "
                "could raise the limit again")
    if layer.network is not None:
        _check_network(layer.network, "net" in ns, say)
    if layer.command_replaces_supervisor:
        if layer.command is None:
            say("command_replaces_supervisor", "needs a command")
        elif layer.command.tty:
            say("command.tty", "cannot be combined with command_replaces_supervisor")
        for fieldname in needs_supervisor(layer):
            say("command_replaces_supervisor", f"leaves no supervisor for {fieldname}; "
                "remove them")
    commands = [("command", layer.command)] if layer.command else []
    commands += [(f"companions[{i}]", c) for i, c in enumerate(layer.companions)]
    for where, command in commands:
        if not command.argv or not command.argv[0]:
            say(where, "argv must name a program")
        if command.cwd is not None and not command.cwd.startswith("/"):
            say(f"{where}.cwd", "must be an absolute path")
        if any(fd < 0 for fd in command.pass_fds):
            say(f"{where}.pass_fds", "fds must be >= 0")
        if command.early and where == "command":
            say("command.early", "only companions start early; the command starts at the go")


def _check_network(net: Network, own_namespace: bool, say) -> None:
    if not own_namespace:
        say("network", "needs a network namespace of the layer's own; add \"net\" to namespaces")
    if not net.nat:
        for name in ("forward", "host_ports", "resolvers", "rate", "delay_ms"):
            if getattr(net, name):
                say(f"network.{name}", "needs nat = true (without it only loopback exists)")
    ports = [(f"forward[{i}].host_port", f.host_port) for i, f in enumerate(net.forward)]
    ports += [(f"forward[{i}].port", f.port) for i, f in enumerate(net.forward)]
    ports += [(f"host_ports[{i}].port", h.port) for i, h in enumerate(net.host_ports)]
    if net.host_ports and net.nat_with != "pasta":
        say("network.host_ports", "needs pasta: slirp4netns reaches every host loopback port "
            "or none")
    for where, port in ports:
        if not 0 < port < 65536:
            say(f"network.{where}", f"{port} is not a port (1 to 65535)")
    for where, address in [(f"forward[{i}].host_address", f.host_address)
                           for i, f in enumerate(net.forward)] + [
            (f"resolvers[{i}]", a) for i, a in enumerate(net.resolvers)]:
        if not _ip(address, prefix=False):
            say(f"network.{where}", f"{address!r} is not an IP address")
    for key in ("deny", "allow"):
        for index, rule in enumerate(getattr(net, key)):
            where = f"network.{key}[{index}]"
            if rule.to != "any" and not _ip(rule.to, prefix=True):
                say(f"{where}.to", f"{rule.to!r} is not an address or prefix (or \"any\")")
            if rule.ports is not None and (rule.protocol is None or not
                                           0 < rule.ports[0] <= rule.ports[1] < 65536):
                say(f"{where}.ports", "needs a protocol and 1 <= first <= last <= 65535")
    if not 576 <= net.mtu <= 65520:
        say("network.mtu", "must be 576 to 65520")
    for name in ("rate", "delay_ms"):
        if getattr(net, name) is not None and getattr(net, name) < 1:
            say(f"network.{name}", "must be >= 1")


def _ip(text: str, prefix: bool) -> bool:
    import ipaddress  # (only specs with a network pay for it)

    try:
        (ipaddress.ip_network if prefix else ipaddress.ip_address)(text)
    except ValueError:
        return False
    return True


def _check_resources(resources: Resources, say) -> None:
    for name in ("memory", "memory_high", "swap"):
        value = getattr(resources, name)
        if value is not None and value < (0 if name == "swap" else 4096):
            say(f"resources.{name}", "must be >= 0" if name == "swap" else
                "must be at least 4096 bytes")
    if resources.cpu is not None and not 0.01 <= resources.cpu <= 4096:
        say("resources.cpu", "must be between 0.01 and 4096 CPUs")
    if resources.io_weight is not None and not 1 <= resources.io_weight <= 10000:
        say("resources.io_weight", "must be between 1 and 10000")


def _abs_path(say, fieldname: str, path: str) -> None:
    if not path.startswith("/"):
        say(fieldname, f"{path!r} must be an absolute path")
    elif "\0" in path:
        say(fieldname, "must not contain NUL")
    elif ".." in path.split("/"):
        say(fieldname, f"{path!r} must not contain '..'")


def _check_op(layer: Layer, index: int, op: FsOp, ids: Ids, say) -> None:
    for name in ("dest", "path", "src", "upper", "work"):
        value = getattr(op, name, None)
        if value is not None:
            _abs_path(say, name, value)
    target = op.target
    covers_root = isinstance(op, (_Bind, BindFd, Tmpfs, Overlay, TmpOverlay, RoOverlay))
    if target.startswith("/") and posixpath.normpath(target) == "/" and not (
            isinstance(op, (RemountRo, Chmod)) or (covers_root and layer.new_root)):
        say("dest", "cannot be / itself here (only binds, tmpfs and overlays may cover the "
            "new root, with new_root = true)")
    if not layer.new_root and isinstance(op, (Dir, Symlink, File, TmpOverlay)):
        say("op", "needs new_root = true (a private root, and scratch space, to create in)")
    if isinstance(op, (Overlay, TmpOverlay, RoOverlay)):
        needed = 2 if isinstance(op, RoOverlay) else 1
        if len(op.lower) < needed:
            say("lower", f"needs at least {needed} lower director{'ies' if needed > 1 else 'y'}")
        for i, path in enumerate(op.lower):
            _abs_path(say, f"lower[{i}]", path)
    if isinstance(op, _Data) and [op.content, op.data, op.fd].count(None) != 2:
        say("content", "give exactly one of content, data or fd")
    if isinstance(op, (BindFd,)) and op.fd < 0 or isinstance(op, _Data) and (op.fd or 0) < 0:
        say("fd", "must be >= 0")
    if isinstance(op, Tmpfs) and op.size is not None and op.size <= 0:
        say("size", "must be a positive number of bytes")
    if isinstance(op, (Dev, Devpts)) and ids.root_mapped is False:
        say("op", f"a devpts mount needs uid 0 and gid 0 mapped in the layer's user namespace "
            f"(this layer is {ids.uid}:{ids.gid}); build /dev in a layer mapped to 0 and switch "
            "to the user's uid in a sub-layer")
    if isinstance(op, Squashfs) and op.offset is not None and op.offset < 0:
        say("offset", "must be >= 0")
    if isinstance(op, Mqueue) and "ipc" not in layer.namespaces:
        say("op", "mqueue needs an ipc namespace; add \"ipc\" to namespaces")
