"""bubblewrap 0.11.1's command line, parsed the way bubblewrap parses it.

Pure parsing (no trio, no engine, no kernel calls besides reading `--args`/`--add-seccomp-fd`
fds, which bubblewrap also reads while parsing): options are processed strictly left to right
and parsing stops at the first word that is not an option, or after `--`. The result is an
`Invocation`; turning it into a sandbox spec is a separate step. Messages and exit codes are
bubblewrap's: `bwrap: MESSAGE` and status 1 for every error.
"""

from __future__ import annotations

import errno
import os
import sys

import msgspec

from bbld import spec

VERSION = "bubblewrap 0.11.1"
MAX_ARGS = 9000
USAGE_LINE = "usage: {prog} [OPTIONS...] [--] COMMAND [ARGS...]"
# Options that only warn when repeated (the last one wins).
LAST_WINS = {"--chdir", "--exec-label", "--file-label", "--sync-fd", "--block-fd",
             "--userns-block-fd", "--info-fd", "--json-status-fd", "--seccomp", "--userns",
             "--userns2", "--pidns", "--uid", "--gid", "--hostname"}
FILE_CREATORS = {"--dir", "--tmpfs", "--file", "--bind-data", "--ro-bind-data"}
INVALID_SECCOMP = "Invalid seccomp data, must be multiple of 8"
EMPTY_SECCOMP = ("Unable to set up system call filtering as requested: prctl(PR_SET_SECCOMP) "
                 "reported EINVAL. (Hint: this requires a kernel configured with "
                 "CONFIG_SECCOMP and CONFIG_SECCOMP_FILTER.)")
OVERLAY_SRC_ALONE = ("--overlay-src must be followed by another --overlay-src or one of "
                     "--overlay, --tmp-overlay, or --ro-overlay")


class ParseError(Exception):
    """A bad command line: printed as `bwrap: MESSAGE`, exit status 1."""

    level_prefix = False  # whether --level-prefix came before the error


class Invocation(msgspec.Struct, kw_only=True):
    unshare: list[str] = []  # user, user-try, ipc, pid, net, uts, cgroup, cgroup-try
    userns_fd: int | None = None
    userns2_fd: int | None = None
    pidns_fd: int | None = None
    disable_userns: bool = False
    assert_userns_disabled: bool = False
    uid: int | None = None
    gid: int | None = None
    hostname: str | None = None
    chdir: str | None = None
    env: dict[str, str] = {}  # the environment after --setenv/--unsetenv/--clearenv
    lock_files: list[str] = []
    sync_fd: int | None = None
    block_fd: int | None = None
    userns_block_fd: int | None = None
    info_fd: int | None = None
    json_status_fd: int | None = None
    seccomp_fd: int | None = None  # read late, like bubblewrap
    seccomp_programs: list[bytes] = []  # --add-seccomp-fd, read while parsing
    exec_label: str | None = None
    file_label: str | None = None
    new_session: bool = False
    die_with_parent: bool = False
    as_pid_1: bool = False
    caps: list[tuple[str, str]] = []  # ("add" | "drop", CAP_NAME or ALL), in order
    level_prefix: bool = False
    argv0: str | None = None
    ops: list[spec.AnyFsOp] = []
    command: list[str] = []
    warnings: list[str] = []


class Help(Exception):
    """--help: print the usage on stdout and exit 0."""


class Version(Exception):
    """--version: print VERSION and exit 0."""


class Done(Exception):
    """The command line started nothing (--help, --version, an error): what bubblewrap
    would print is printed; exit with `status`."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class FrontEnd:
    """What bubblewrap does with its command line before it builds anything, in this
    process: warnings and errors on stderr in its words (`bwrap: ...`, with `<N>` after
    --level-prefix), --help and --version on stdout. Runs in the instance's monitor, which
    holds the caller's stdio, fds, cwd and environment (the client stays light), and in
    the client for --single-instance, which needs the spec before anything starts."""

    def __init__(self, prog: str = "bbl-bwrap"):
        self.prog = prog
        self.level_prefix = False  # set by the parse: it affects the messages after it

    def say(self, message: str, level: int = 3) -> None:
        prefix = f"<{level}>" if self.level_prefix else ""
        sys.stderr.write(f"{prefix}bwrap: {message}\n")
        sys.stderr.flush()

    def sandbox(self, argv: list[str], environ: dict[str, str], uid: int, gid: int,
                name: str | None = None, open_fds: set[int] | None = None,
                terminal: bool = False) -> spec.Sandbox:
        """The sandbox the command line means. Raises Done. `open_fds`: the fds of the
        caller (default: every fd of this process), see parse(); `terminal`: the caller's
        stdio is a terminal it may relay a pty to (see to_sandbox)."""
        if not argv:
            sys.stderr.write(usage(self.prog))
            raise Done(1)
        try:
            inv = parse(argv, environ, open_fds)
            self.level_prefix = inv.level_prefix
            for warning in inv.warnings:
                self.say(warning, 4)
            sandbox = to_sandbox(inv, uid, gid, terminal)
        except Help:
            sys.stdout.write(usage(self.prog))
            sys.stdout.flush()
            raise Done(0) from None
        except Version:
            print(VERSION, flush=True)
            raise Done(0) from None
        except ParseError as exc:
            self.level_prefix = exc.level_prefix
            if str(exc) == "usage":
                sys.stderr.write(usage(self.prog))
            else:
                self.say(str(exc))
            raise Done(1) from None
        if name is not None:
            sandbox.name = name
        return sandbox

    def start_failed(self, message: str, fields: dict[str, str] | None = None) -> None:
        """A start error, in bubblewrap's words (bwrap_message)."""
        self.say(bwrap_message(message, fields))


def usage(prog: str) -> str:
    lines = [USAGE_LINE.format(prog=prog), ""]
    lines += [f"    {name:<28} {text}" for name, text in HELP]
    return "\n".join(lines) + "\n"


def parse(argv: list[str], environ: dict[str, str],
          open_fds: set[int] | None = None) -> Invocation:
    """Parse bwrap's arguments (without argv[0]). Raises ParseError, Help or Version.
    The fds the parse reads (--args, --add-seccomp-fd, --seccomp) must be among `open_fds`
    when given: in an instance's monitor, which holds fds of its own, only the caller's
    count as open."""
    if argv == ["--version"]:
        raise Version()
    parser = _Parser(dict(environ), open_fds)
    try:
        parser.parse(list(argv), from_args_fd=False)
        return parser.finish()
    except ParseError as exc:
        exc.level_prefix = parser.inv.level_prefix  # so far: bubblewrap's is positional too
        raise


class _Parser:
    def __init__(self, env: dict[str, str], open_fds: set[int] | None = None):
        self.inv = Invocation(env=env)
        self.open_fds = open_fds
        self.count = 0
        self.perms: int | None = None
        self.size: int | None = None
        self.overlay_src: list[str] = []
        self.seen: set[str] = set()
        self.consumed: set[int] = set()  # fds read and closed already

    # ------------------------------------------------------------ the loop

    def parse(self, args: list[str], from_args_fd: bool) -> None:
        self.count += len(args)
        if self.count > MAX_ARGS:
            raise ParseError("Exceeded maximum number of arguments 9000")
        while args:
            word = args[0]
            if word == "--":
                args.pop(0)
                if not from_args_fd:
                    self.inv.command = args
                return
            if not word.startswith("-"):
                if not from_args_fd:
                    self.inv.command = args
                return
            args.pop(0)
            self._check_modifiers(word)
            handler = OPTIONS.get(word)
            if handler is None:
                raise ParseError(f"Unknown option {word}")
            name, arity, action = handler
            if len(args) < arity:
                plural = {1: "an argument", 2: "two arguments", 3: "three arguments"}[arity]
                raise ParseError(f"{name} takes {plural}")
            values, args[:arity] = args[:arity], []
            if name in LAST_WINS and name in self.seen:
                self.inv.warnings.append(f"Only the last {name} option will take effect")
            self.seen.add(name)
            if name == "--args":
                if from_args_fd:
                    raise ParseError("--args not supported in arguments file")
                self._args_fd(values[0])
                continue
            action(self, *values)

    def _check_modifiers(self, word: str) -> None:
        """--perms/--size apply to the very next option; --overlay-src to the next overlay."""
        if self.perms is not None and word not in FILE_CREATORS | {"--size", "--perms"}:
            raise ParseError("--perms must be followed by an option that creates a file")
        if self.size is not None and word not in ("--tmpfs", "--perms", "--size"):
            raise ParseError("--size must be followed by --tmpfs")
        if self.overlay_src and word not in ("--overlay-src", "--overlay", "--tmp-overlay",
                                             "--ro-overlay"):
            raise ParseError(OVERLAY_SRC_ALONE)

    def _args_fd(self, value: str) -> None:
        data = self._consume(value, "--args data")
        words = data.split(b"\0")
        if words and words[-1] == b"":
            words.pop()
        self.parse([os.fsdecode(w) for w in words], from_args_fd=True)

    def finish(self) -> Invocation:
        inv = self.inv
        if self.perms is not None:
            raise ParseError("--perms must be followed by an option that creates a file")
        if self.size is not None:
            raise ParseError("--size must be followed by --tmpfs")
        if self.overlay_src:
            raise ParseError(OVERLAY_SRC_ALONE)
        if not inv.command:
            raise ParseError("usage")  # the caller prints the usage on stderr
        user = "user" in inv.unshare or "user-try" in inv.unshare
        if inv.userns_fd is not None and user:
            raise ParseError("--userns not compatible --unshare-user")
        if inv.disable_userns and not user:
            raise ParseError("--disable-userns requires --unshare-user")
        if inv.userns_block_fd is not None and not user:
            raise ParseError("--userns-block-fd requires --unshare-user")
        if inv.disable_userns and inv.userns_block_fd is not None:
            raise ParseError("--disable-userns is not compatible with  --userns-block-fd")
        if inv.userns_block_fd is not None and inv.info_fd is None:
            raise ParseError("--userns-block-fd requires --info-fd")
        if inv.hostname is not None and "uts" not in inv.unshare:
            raise ParseError("Specifying --hostname requires --unshare-uts")
        if inv.as_pid_1 and "pid" not in inv.unshare:
            raise ParseError("Specifying --as-pid-1 requires --unshare-pid")
        if inv.as_pid_1 and inv.lock_files:
            raise ParseError("Specifying --as-pid-1 and --lock-file is not permitted")
        return inv

    # ------------------------------------------------------------ option actions

    def _unshare(self, *names: str) -> None:
        for name in names:
            if name not in self.inv.unshare:
                self.inv.unshare.append(name)

    def _take_perms(self, default: int) -> int:
        perms, self.perms = self.perms, None
        return default if perms is None else perms

    def _perms(self, value: str) -> None:
        if self.perms is not None:
            raise ParseError("--perms given twice for the same action")
        self.perms = _octal(value, "--perms")

    def _size(self, value: str) -> None:
        if self.size is not None:
            raise ParseError("--size given twice for the same action")
        try:
            size = int(value, 0) if value[:1].isdigit() else 0
        except ValueError:
            size = 0
        if size <= 0 or size > (1 << 63) - 1:
            raise ParseError("--size takes a non-zero number of bytes")
        self.size = size

    def _op(self, op) -> None:
        op.parents_mode = _parents_mode(getattr(op, "mode", 0))
        self.inv.ops.append(op)

    def _tmpfs(self, dest: str) -> None:
        size, self.size = self.size, None
        self._op(spec.Tmpfs(dest=dest, mode=self._take_perms(0o755), size=size))

    def _setenv(self, name: str, value: str) -> None:
        self.inv.env[name] = value

    def _unsetenv(self, name: str) -> None:
        self.inv.env.pop(name, None)

    def _argv0(self, value: str) -> None:
        if self.inv.argv0 is not None:
            raise ParseError("--argv0 used multiple times")
        self.inv.argv0 = value

    def _add_seccomp(self, value: str) -> None:
        if self.inv.seccomp_fd is not None:
            raise ParseError("--add-seccomp-fd cannot be combined with --seccomp")
        data = self._consume(value, "seccomp data")
        if len(data) % 8:  # (an empty one fails only when it is loaded: _seccomp)
            raise ParseError(INVALID_SECCOMP)
        self.inv.seccomp_programs.append(data)

    def _seccomp(self, value: str) -> None:
        if self.inv.seccomp_programs:
            raise ParseError("--seccomp cannot be combined with --add-seccomp-fd")
        self.inv.seccomp_fd = int(self._callers(value, "seccomp data"))

    def _callers(self, value: str, what: str) -> str:
        """`value` if it names one of the caller's fds, still open; else what reading it
        would say (an fd read once was closed: bubblewrap's second read finds it so)."""
        if self.open_fds is not None and _fd(value) not in self.open_fds \
                or _fd(value) in self.consumed:
            raise ParseError(f"Can't read {what}: Bad file descriptor")
        return value

    def _consume(self, value: str, what: str) -> bytes:
        """Read a caller's fd named on the command line to EOF and close it, as bubblewrap
        does."""
        data = _consume_fd(self._callers(value, what), what)
        self.consumed.add(_fd(value))
        return data


def _parents_mode(perms: int) -> int:
    """The mode of the parents bubblewrap creates for an operation with these perms: 0755,
    less group r-x if the operation gives the group nothing, less others' r-x likewise
    (`--perms 0750 --dir` -> 0750, a 0600 `--bind-data` -> 0700). Operations without perms
    (binds, `--symlink`, `--proc`, ...) count as 0: their parents are 0700."""
    mode = 0o755
    if not perms & 0o070:
        mode &= ~0o050
    if not perms & 0o007:
        mode &= ~0o005
    return mode


def _fd(value: str) -> int:
    if not value or not value.isdigit():
        raise ParseError(f"Invalid fd: {value}")
    return int(value)


def _octal(value: str, option: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise ParseError(f"{option} takes an octal argument <= 07777")
    return mode


def _int(value: str, option: str) -> int:
    if not value.isdigit():
        raise ParseError(f"Invalid {option}: {value}")
    return int(value)


def _consume_fd(value: str, what: str) -> bytes:
    fd = _fd(value)
    try:
        data = _read_all(fd)
        os.close(fd)
    except OSError as exc:
        raise ParseError(f"Can't read {what}: {exc.strerror}") from None
    return data


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _data_action(kind, default_mode: int):
    def action(parser: _Parser, fd: str, dest: str):
        parser._op(kind(dest=dest, fd=_fd(fd), mode=parser._take_perms(default_mode)))
    return action


def _overlay_action(kind):
    name = {spec.Overlay: "--overlay", spec.TmpOverlay: "--tmp-overlay",
            spec.RoOverlay: "--ro-overlay"}[kind]
    needed = 2 if kind is spec.RoOverlay else 1

    def action(parser: _Parser, *values):
        # the last --overlay-src is the top layer; a spec lists the top-most first
        lower, parser.overlay_src = parser.overlay_src[::-1], []
        if len(lower) < needed:
            raise ParseError(f"{name} requires at least {needed} --overlay-src")
        if kind is spec.Overlay:
            upper, work, dest = values
            parser._op(spec.Overlay(lower=lower, upper=upper, work=work, dest=dest))
        else:
            parser._op(kind(lower=lower, dest=values[0]))
    return action


def _cap_action(kind: str):
    def action(parser: _Parser, name: str):
        if name.upper() != "ALL":
            try:
                spec.capability_number(name)
            except ValueError:
                raise ParseError(f"unknown cap: {name}") from None
        parser.inv.caps.append((kind, name))
    return action


def _no_labels(parser: _Parser, value: str) -> None:
    raise ParseError("labeling not supported on this system")


def _help(parser: _Parser) -> None:
    raise Help()


def _version(parser: _Parser) -> None:
    raise Version()


def _flag(attribute: str):
    return lambda parser: setattr(parser.inv, attribute, True)


def _set(attribute: str, convert=lambda v: v):
    return lambda parser, value: setattr(parser.inv, attribute, convert(value))


P = _Parser
OPTIONS = {
    "--help": ("--help", 0, _help),
    "--version": ("--version", 0, _version),
    "--args": ("--args", 1, None),
    "--argv0": ("--argv0", 1, P._argv0),
    "--level-prefix": ("--level-prefix", 0, _flag("level_prefix")),
    "--unshare-all": ("--unshare-all", 0, lambda p: p._unshare(
        "user-try", "ipc", "pid", "net", "uts", "cgroup-try")),
    "--share-net": ("--share-net", 0, lambda p: p.inv.unshare.remove("net")
                    if "net" in p.inv.unshare else None),
    "--userns": ("--userns", 1, _set("userns_fd", _fd)),
    "--userns2": ("--userns2", 1, _set("userns2_fd", _fd)),
    "--pidns": ("--pidns", 1, _set("pidns_fd", _fd)),
    "--disable-userns": ("--disable-userns", 0, _flag("disable_userns")),
    "--assert-userns-disabled": ("--assert-userns-disabled", 0, _flag("assert_userns_disabled")),
    "--uid": ("--uid", 1, _set("uid", lambda v: _int(v, "uid"))),
    "--gid": ("--gid", 1, _set("gid", lambda v: _int(v, "gid"))),
    "--hostname": ("--hostname", 1, _set("hostname")),
    "--chdir": ("--chdir", 1, _set("chdir")),
    "--clearenv": ("--clearenv", 0, lambda p: p.inv.env.clear()),
    "--setenv": ("--setenv", 2, P._setenv),
    "--unsetenv": ("--unsetenv", 1, P._unsetenv),
    "--lock-file": ("--lock-file", 1, lambda p, v: p.inv.lock_files.append(v)),
    "--sync-fd": ("--sync-fd", 1, _set("sync_fd", _fd)),
    "--block-fd": ("--block-fd", 1, _set("block_fd", _fd)),
    "--userns-block-fd": ("--userns-block-fd", 1, _set("userns_block_fd", _fd)),
    "--info-fd": ("--info-fd", 1, _set("info_fd", _fd)),
    "--json-status-fd": ("--json-status-fd", 1, _set("json_status_fd", _fd)),
    "--seccomp": ("--seccomp", 1, P._seccomp),
    "--add-seccomp-fd": ("--add-seccomp-fd", 1, P._add_seccomp),
    "--exec-label": ("--exec-label", 1, _no_labels),
    "--file-label": ("--file-label", 1, _no_labels),
    "--new-session": ("--new-session", 0, _flag("new_session")),
    "--die-with-parent": ("--die-with-parent", 0, _flag("die_with_parent")),
    "--as-pid-1": ("--as-pid-1", 0, _flag("as_pid_1")),
    "--cap-add": ("--cap-add", 1, _cap_action("add")),
    "--cap-drop": ("--cap-drop", 1, _cap_action("drop")),
    "--perms": ("--perms", 1, P._perms),
    "--size": ("--size", 1, P._size),
    "--bind": ("--bind", 2, lambda p, s, d: p._op(spec.Bind(src=s, dest=d))),
    "--bind-try": ("--bind-try", 2, lambda p, s, d: p._op(spec.Bind(src=s, dest=d, try_=True))),
    "--dev-bind": ("--dev-bind", 2, lambda p, s, d: p._op(spec.DevBind(src=s, dest=d))),
    "--dev-bind-try": ("--dev-bind-try", 2,
                       lambda p, s, d: p._op(spec.DevBind(src=s, dest=d, try_=True))),
    "--ro-bind": ("--ro-bind", 2, lambda p, s, d: p._op(spec.RoBind(src=s, dest=d))),
    "--ro-bind-try": ("--ro-bind-try", 2,
                      lambda p, s, d: p._op(spec.RoBind(src=s, dest=d, try_=True))),
    "--bind-fd": ("--bind-fd", 2, lambda p, f, d: p._op(spec.BindFd(fd=_fd(f), dest=d))),
    "--ro-bind-fd": ("--ro-bind-fd", 2,
                     lambda p, f, d: p._op(spec.RoBindFd(fd=_fd(f), dest=d))),
    "--remount-ro": ("--remount-ro", 1, lambda p, d: p._op(spec.RemountRo(dest=d))),
    "--overlay-src": ("--overlay-src", 1, lambda p, s: p.overlay_src.append(s)),
    "--overlay": ("--overlay", 3, _overlay_action(spec.Overlay)),
    "--tmp-overlay": ("--tmp-overlay", 1, _overlay_action(spec.TmpOverlay)),
    "--ro-overlay": ("--ro-overlay", 1, _overlay_action(spec.RoOverlay)),
    "--proc": ("--proc", 1, lambda p, d: p._op(spec.Proc(dest=d))),
    "--dev": ("--dev", 1, lambda p, d: p._op(spec.Dev(dest=d, shm_tmpfs=False))),
    "--tmpfs": ("--tmpfs", 1, P._tmpfs),
    "--mqueue": ("--mqueue", 1, lambda p, d: p._op(spec.Mqueue(dest=d))),
    "--dir": ("--dir", 1, lambda p, d: p._op(spec.Dir(dest=d, mode=p._take_perms(0o755)))),
    "--file": ("--file", 2, _data_action(spec.File, 0o666)),
    "--bind-data": ("--bind-data", 2, _data_action(spec.BindData, 0o600)),
    "--ro-bind-data": ("--ro-bind-data", 2, _data_action(spec.RoBindData, 0o600)),
    "--symlink": ("--symlink", 2,
                  lambda p, t, d: p._op(spec.Symlink(target_path=t, dest=d))),
    "--chmod": ("--chmod", 2,
                lambda p, m, d: p._op(spec.Chmod(path=d, mode=_octal(m, "--chmod")))),
}
for _name in ("user", "user-try", "ipc", "pid", "net", "uts", "cgroup", "cgroup-try"):
    OPTIONS[f"--unshare-{_name}"] = (f"--unshare-{_name}", 0,
                                     lambda p, n=_name: p._unshare(n))

HELP = [
    ("--help", "Print this help"),
    ("--version", "Print version"),
    ("--args FD", "Parse NUL-separated args from FD"),
    ("--argv0 VALUE", "Set argv[0] to the value VALUE before running the program"),
    ("--level-prefix", "Prepend e.g. <3> to diagnostic messages"),
    ("--unshare-all", "Unshare every namespace we support by default"),
    ("--share-net", "Retain the network namespace (can only combine with --unshare-all)"),
    ("--unshare-user", "Create new user namespace"),
    ("--unshare-user-try", "Create new user namespace if possible, else continue without"),
    ("--unshare-ipc", "Create new ipc namespace"),
    ("--unshare-pid", "Create new pid namespace"),
    ("--unshare-net", "Create new network namespace"),
    ("--unshare-uts", "Create new uts namespace"),
    ("--unshare-cgroup", "Create new cgroup namespace"),
    ("--unshare-cgroup-try", "Create new cgroup namespace if possible, else continue without"),
    ("--userns FD", "Use this user namespace (cannot combine with --unshare-user)"),
    ("--userns2 FD", "After setup switch to this user namespace, only useful with --userns"),
    ("--disable-userns", "Disable further use of user namespaces inside sandbox"),
    ("--assert-userns-disabled", "Fail unless user namespaces are disabled inside sandbox"),
    ("--pidns FD", "Use this pid namespace (as parent namespace if using --unshare-pid)"),
    ("--uid UID", "Custom uid in the sandbox (requires --unshare-user or --userns)"),
    ("--gid GID", "Custom gid in the sandbox (requires --unshare-user or --userns)"),
    ("--hostname NAME", "Custom hostname in the sandbox (requires --unshare-uts)"),
    ("--chdir DIR", "Change directory to DIR"),
    ("--clearenv", "Unset all environment variables"),
    ("--setenv VAR VALUE", "Set an environment variable"),
    ("--unsetenv VAR", "Unset an environment variable"),
    ("--lock-file DEST", "Take a lock on DEST while sandbox is running"),
    ("--sync-fd FD", "Keep this fd open while sandbox is running"),
    ("--bind SRC DEST", "Bind mount the host path SRC on DEST"),
    ("--bind-try SRC DEST", "Equal to --bind but ignores non-existent SRC"),
    ("--dev-bind SRC DEST", "Bind mount the host path SRC on DEST, allowing device access"),
    ("--dev-bind-try SRC DEST", "Equal to --dev-bind but ignores non-existent SRC"),
    ("--ro-bind SRC DEST", "Bind mount the host path SRC readonly on DEST"),
    ("--ro-bind-try SRC DEST", "Equal to --ro-bind but ignores non-existent SRC"),
    ("--bind-fd FD DEST", "Bind open directory or path fd on DEST"),
    ("--ro-bind-fd FD DEST", "Bind open directory or path fd read-only on DEST"),
    ("--remount-ro DEST", "Remount DEST as readonly"),
    ("--overlay-src SRC", "Read files from SRC in the following overlay"),
    ("--overlay RWSRC WORKDIR DEST", "Mount overlayfs on DEST, with RWSRC as the host path "
     "for writes and WORKDIR an empty directory on the same filesystem as RWSRC"),
    ("--tmp-overlay DEST", "Mount overlayfs on DEST, with writes going to an invisible tmpfs"),
    ("--ro-overlay DEST", "Mount overlayfs read-only on DEST"),
    ("--exec-label LABEL", "Exec label for the sandbox"),
    ("--file-label LABEL", "File label for temporary sandbox content"),
    ("--proc DEST", "Mount new procfs on DEST"),
    ("--dev DEST", "Mount new dev on DEST"),
    ("--tmpfs DEST", "Mount new tmpfs on DEST"),
    ("--mqueue DEST", "Mount new mqueue on DEST"),
    ("--dir DEST", "Create dir at DEST"),
    ("--file FD DEST", "Copy from FD to destination DEST"),
    ("--bind-data FD DEST", "Copy from FD to file which is bind-mounted on DEST"),
    ("--ro-bind-data FD DEST", "Copy from FD to file which is readonly bind-mounted on DEST"),
    ("--symlink SRC DEST", "Create symlink at DEST with target SRC"),
    ("--seccomp FD", "Load and use seccomp rules from FD (not repeatable)"),
    ("--add-seccomp-fd FD", "Load and use seccomp rules from FD (repeatable)"),
    ("--block-fd FD", "Block on FD until some data to read is available"),
    ("--userns-block-fd FD", "Block on FD until the user namespace is ready"),
    ("--info-fd FD", "Write information about the running container to FD"),
    ("--json-status-fd FD", "Write container status to FD as multiple JSON documents"),
    ("--new-session", "Create a new terminal session"),
    ("--die-with-parent", "Kill the sandbox when the caller dies"),
    ("--as-pid-1", "Do not install a reaper process with PID=1"),
    ("--cap-add CAP", "Add cap CAP when running as privileged user"),
    ("--cap-drop CAP", "Drop cap CAP when running as privileged user"),
    ("--perms OCTAL", "Set permissions of next argument (--bind-data, --file, etc.)"),
    ("--size BYTES", "Set size of next argument (only for --tmpfs)"),
    ("--chmod OCTAL PATH", "Change permissions of PATH (must already exist)"),
]


# ---------------------------------------------------------------- into a spec

UNSUPPORTED = {  # parsed, but refused: why, in docs/bwrap-compat.md
    "userns2_fd": "--userns2 is not supported by bbl-bwrap: the sandbox's processes are "
                  "supervised by bbld, not by a bwrap process that could switch namespaces",
}


# The engine's start errors that bubblewrap words its own way: (pattern, bubblewrap's words)
def bwrap_message(message: str, fields: dict[str, str] | None = None) -> str:
    """A start error as bubblewrap would say it, from the engine's fields for it
    (bbld.engine.errors.StartError: what happened, where, the path, the kernel's words,
    and its own words without layer and place: `message`);
    an error bubblewrap has no words of its own for keeps the engine's, without the layer
    and the command (a bubblewrap command line has one of each)."""
    fields = fields or {}
    message = fields.get("message", message)  # (the words without layer and where)
    path, strerror = fields.get("path"), fields.get("strerror")
    worded = {"source-missing": f"Can't find source path {path}: No such file or directory",
              "chdir": f"Can't chdir to {path}: {strerror}",
              "exec": f"execvp {fields.get('command')}: {strerror}",
              "symlink": f"Can't make symlink at {path}: {strerror}",
              "mkdir": f"Can't mkdir {path}: {strerror}",
              "namespaces": f"Creating new namespace failed: {strerror}",
              "join-user": "Joining the specified user namespace failed, it might not be a "
                           "descendant of the current user namespace."
                           if strerror == os.strerror(errno.EINVAL) else
                           f"Joining specified user namespace failed: {strerror}",
              "join-pid": f"Setting pidns failed: {strerror}"}
    if fields.get("what") in worded:
        return worded[fields["what"]]
    where = fields.get("where", "")
    return f"{where}: {message}" if where and not where.startswith("command ") else message


def to_sandbox(inv: Invocation, uid: int, gid: int, terminal: bool = False) -> spec.Sandbox:
    """The layer tree a bubblewrap command line means, for a caller with this uid/gid.

    The command is always in a session of its own: it never shares the caller's terminal.
    On a `terminal` (a caller that relays a pty: the client) without --new-session, it gets
    a pty from the sandbox's own devpts instead, as its controlling terminal: an interactive
    shell then has job control and Ctrl-C/Ctrl-Z, as it would under bubblewrap, without the
    host terminal ever being in reach (TIOCSTI).

    One layer holds bubblewrap's namespaces and its new root. bubblewrap maps uid 0 first when
    it mounts a devpts (`--dev`) and then switches to the sandbox uid in a nested user
    namespace, and --disable-userns also runs the command in a nested user namespace; here
    that is literally two layers: `bwrap` (builds the view) and `sandbox` (runs the command).
    """
    for attribute, message in UNSUPPORTED.items():
        if getattr(inv, attribute) not in (None, False, []):
            raise ParseError(message)
    namespaces = ["mount"]
    joins_user = inv.userns_fd is not None
    user = (uid != 0 and not joins_user) or any(n in inv.unshare for n in ("user", "user-try"))
    if user:
        namespaces.insert(0, "user")
    elif not joins_user and (inv.uid is not None or inv.gid is not None):
        raise ParseError("Specifying --uid requires --unshare-user or --userns" if inv.uid
                         is not None else "Specifying --gid requires --unshare-user or --userns")
    for name in ("ipc", "pid", "net", "uts", "cgroup"):
        if name in inv.unshare or f"{name}-try" in inv.unshare:
            namespaces.append(name)
    sandbox_uid = inv.uid if inv.uid is not None else uid
    sandbox_gid = inv.gid if inv.gid is not None else gid
    needs_root = user and any(isinstance(op, (spec.Dev, spec.Devpts)) for op in inv.ops) \
        and (sandbox_uid, sandbox_gid) != (0, 0) and inv.userns_block_fd is None
    tty = terminal and not inv.new_session and not inv.as_pid_1 and _has_ptmx(inv.ops)
    command = spec.Command(argv=inv.command, argv0=inv.argv0, cwd=inv.chdir, new_session=True,
                           tty=tty)
    leaf_keys = dict(env=spec.Env(clear=True, set=inv.env), command=command,
                     caps=_caps(inv, uid),
                     ambient_caps=bool(inv.caps), seccomp=_seccomp(inv),
                     command_replaces_supervisor=inv.as_pid_1,
                     user_namespaces="assert-denied" if inv.assert_userns_disabled else "allow")
    outer = spec.Layer(name="bwrap", namespaces=namespaces, hostname=inv.hostname,
                       new_root=True, root_readonly=False, fs=_found_sources(inv.ops),
                       lock_files=list(inv.lock_files))
    if joins_user or inv.pidns_fd is not None:
        outer.join = spec.Join(user=inv.userns_fd, pid=inv.pidns_fd)
    if user or joins_user:
        # in a joined namespace, or with maps someone else writes, the ids are theirs to map
        theirs = joins_user or inv.userns_block_fd is not None
        outer.uid, outer.gid = (0, 0) if needs_root else (inv.uid, inv.gid) if theirs \
            else (sandbox_uid, sandbox_gid)
    inner = spec.Layer(name="sandbox", **leaf_keys)
    if needs_root or inv.disable_userns:
        # the limit is set in the outer user namespace; the command's capabilities, in the
        # nested one, cannot raise it
        outer.user_namespaces = "deny" if inv.disable_userns else "allow"
        inner.namespaces, inner.uid, inner.gid = ["user"], sandbox_uid, sandbox_gid
    if inv.as_pid_1 and inner.namespaces:  # the command, pid 1 of a namespace of its own
        inner.namespaces += ["mount", "pid"]
    if inv.pidns_fd is not None and "pid" in namespaces:
        # a new pid namespace under a joined one is created by a process born in the joined one
        namespaces.remove("pid")
        inner.namespaces += ["mount", "pid"]
    if inner.namespaces:
        outer.layers = [inner]
    else:
        for key, value in leaf_keys.items():
            setattr(outer, key, value)
    return spec.Sandbox(name="bwrap", layer=outer, die_with_parent=inv.die_with_parent,
                        info_fd=inv.info_fd, json_status_fd=inv.json_status_fd,
                        block_fd=inv.block_fd, sync_fd=inv.sync_fd,
                        userns_block_fd=inv.userns_block_fd)


def _has_ptmx(ops: list[spec.AnyFsOp]) -> bool:
    """Whether the view ends with a /dev that makes ptys: --dev /dev, or a --dev-bind of the
    host's / or /dev (a plain bind's nodev makes /dev/ptmx unusable)."""
    usable = False
    for op in ops:
        if getattr(op, "dest", None) in ("/", "/dev"):
            usable = isinstance(op, spec.DevBind) or isinstance(op, spec.Dev) \
                and op.dest == "/dev"
    return usable


def _found_sources(ops: list[spec.AnyFsOp]) -> list[spec.AnyFsOp]:
    """The operations with their host paths as bubblewrap finds them: it realpath()s every
    source against its working directory before it builds anything, so `--bind dir /mnt`
    and `--overlay-src ../l` work. Absolute paths without `..` stay as written (the engine
    resolves them in the caller's view, and a missing one is named as given)."""
    found = []
    for op in ops:
        if isinstance(op, (spec.Bind, spec.DevBind, spec.RoBind)):
            op = msgspec.structs.replace(op, src=_source(op.src))
        elif isinstance(op, (spec.Overlay, spec.TmpOverlay, spec.RoOverlay)):
            op = msgspec.structs.replace(op, lower=[_source(p) for p in op.lower])
            if isinstance(op, spec.Overlay):
                op = msgspec.structs.replace(op, upper=_source(op.upper), work=_source(op.work))
        found.append(op)
    return found


def _source(path: str) -> str:
    if path.startswith("/") and ".." not in path.split("/"):
        return path
    return os.path.realpath(path)


def _caps(inv: Invocation, uid: int) -> list[str]:
    """bubblewrap: no capabilities for an unprivileged caller; root keeps those it has (a
    container's root may lack some); then --cap-add/--cap-drop in order. Without those
    options they are not made ambient (ambient_caps): a command whose uid is not 0 loses
    them at execve, as under bubblewrap."""
    kept = _own_capabilities() if uid == 0 else set()
    for kind, name in inv.caps:
        names = set(spec.CAPABILITIES) if name.upper() == "ALL" else \
            {spec.CAPABILITIES[spec.capability_number(name)]}
        kept = kept | names if kind == "add" else kept - names
    return sorted(kept, key=spec.CAPABILITIES.index)


def _own_capabilities() -> set[str]:
    """The names of the capabilities in this process's effective set."""
    with open("/proc/self/status") as f:
        bits = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return {name for number, name in enumerate(spec.CAPABILITIES) if bits >> number & 1}


def _seccomp(inv: Invocation) -> spec.Seccomp | None:
    """The programs to load; read --seccomp's fd now, as bubblewrap does while it sets up.
    An empty program is what the kernel refuses when it is loaded (bubblewrap's words)."""
    programs = list(inv.seccomp_programs)
    if inv.seccomp_fd is not None:
        try:
            programs.append(_read_all(inv.seccomp_fd))
        except OSError as exc:
            raise ParseError(f"Can't read seccomp data: {exc.strerror}") from None
        if len(programs[-1]) % 8:
            raise ParseError(INVALID_SECCOMP)
    if any(not program for program in programs):
        raise ParseError(EMPTY_SECCOMP)
    return spec.Seccomp(programs=programs) if programs else None
