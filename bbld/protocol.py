"""The Varlink protocol as BBL speaks it: framing, message types, errors, interface texts.

The daemon's side (imports neither trio nor the engine; the client speaks the same protocol
without msgspec, through bblctl.wire and bbld.channel). A message is one JSON object followed
by a NUL byte. Calls and replies are msgspec Structs; errors are replies
with an `error` name and parameters. The interface definitions below are what
`org.varlink.service.GetInterfaceDescription` returns and what docs/api.md shows.
"""

from __future__ import annotations

from typing import Any

import msgspec

from bbld import channel

MAX_MESSAGE = channel.MAX_MESSAGE  # a longer message ends the connection (InvalidMessage)
MAX_FDS = 64  # file descriptors (SCM_RIGHTS) with one message
VENDOR, PRODUCT, URL = "BBL", "bbld", "https://example.invalid/bbl"

SERVICE_INTERFACE = """\
# The Varlink Service Interface is provided by every varlink service. It
# describes the service and the interfaces it implements.
interface org.varlink.service

# Get a list of all the interfaces a service provides and information
# about the implementation.
method GetInfo() -> (
  vendor: string,
  product: string,
  version: string,
  url: string,
  interfaces: []string
)

# Get the description of an interface that is implemented by this service.
method GetInterfaceDescription(interface: string) -> (description: string)

# The requested interface was not found.
error InterfaceNotFound (interface: string)

# The requested method was not found
error MethodNotFound (method: string)

# The interface defines the requested method, but the service does not
# implement it.
error MethodNotImplemented (method: string)

# One of the passed parameters is invalid.
error InvalidParameter (parameter: string)

# Client is denied access
error PermissionDenied ()

# Method is expected to be called with 'more' set to true, but wasn't
error ExpectedMore ()
"""

MANAGER_INTERFACE = """\
# The BBL daemon: the sandbox instances of one user.
interface io.bbl.Manager

# Who answers: the daemon's version and process id.
method Ping() -> (version: string, pid: int)

# The daemon itself: version, pid, when it started (seconds since the
# epoch) and how ("by hand", "autostart" by a client, "socket activation"
# by systemd), the socket it listens on, its runtime directory, how many
# instances run, how many ended ones it remembers, and how many callers
# follow Events; cgroup, the delegated cgroup instances' limits go in (its
# BBL_CGROUP, or its own under systemd), and the controllers it has there.
method Status() -> (
  version: string,
  pid: int,
  started: float,
  started_by: string,
  socket: string,
  runtime: string,
  instances: int,
  ended: int,
  watchers: int,
  cgroup: ?string,
  controllers: ?[]string
)

# End the daemon after the reply. The instances run on (their monitors hold
# them) and the next daemon adopts them; under systemd the socket stays and
# the next connection starts a new daemon.
method Quit() -> ()

# Start a sandbox and follow it to its end. The sandbox is a spec (JSON, see
# docs/spec.md), a profile (an absolute file path, or a name looked up with
# env's XDG_CONFIG_HOME and HOME; the daemon expands it with env, name
# renames it and tty gives its main command a terminal made inside the
# sandbox; a bad profile fails with StartFailed and exit_code 2), or a
# bubblewrap command line (bwrap, its options and
# command): the instance's monitor interprets it with the caller's fds,
# working directory and environment, and prints what bubblewrap would print
# on the caller's stderr and stdout (warnings, errors, --help, --version; prog
# names the program in usage texts); name replaces its name "bwrap"; tty says
# the caller relays a pty: a command line without --new-session whose view
# can make ptys then runs on one made inside the sandbox, as its
# controlling terminal.
# Call it with "more": the first reply has event "started" (the instance id
# and, per layer, its name, the host pid of its supervisor when it started
# (the supervisor of a layer with nothing to run exits or becomes a minimal
# init; 0 for a layer built by its parent's process), its namespace ids,
# its uid and gid inside, and its fate: "supervise", "step-aside", "inline",
# "retire" or "replaced", see docs/architecture.md); the last has event
# "exited" and the main command's status (a
# command line that starts nothing, such as --help, has only that one).
# A spec with single_instance whose name a running instance already has
# starts nothing: its main command's arguments (and args) go to that
# instance as SendArgs would send them; the first reply is then "forwarded"
# (id and pid), the last "exited" with the forwarding command's status.
# The "started" reply carries the profile's notices, one line each, when it
# has any (what the host could not give and what was done instead, e.g. a
# Wayland compositor without security contexts); the caller should print
# them. The "started" reply says die_with_parent when the spec (or command line)
# asks for it: the caller should then end when its own parent does (bwrap's
# --die-with-parent; its end ends the instance).
# When the main command has tty (a pty from its layer's devpts), the
# instance's monitor holds the pty from start to end, and the "started"
# reply says tty and carries the caller's end of it, as Attach's does (see
# there): the caller may detach, and Attach shows the terminal again. With
# detach, no client end comes (nobody is attached), so the caller may leave.
# Four file descriptors travel with the call (SCM_RIGHTS), in this order:
# stdin, stdout and stderr for the sandbox, and its working directory;
# then one fd for each entry of fd_numbers, which the spec or command line
# refers to by that number (bind-fd, file and data fds; the monitor closes
# those a command line does not name). env is the environment layer 1
# starts from; args extend the main command. With die_with_client (or a
# spec's die_with_parent), the instance is killed when the caller's
# connection ends. StartFailed's reported says the caller's stderr has the
# message already.
method Run(
  spec: ?string,
  profile: ?string,
  tty: ?bool,
  bwrap: ?[]string,
  prog: ?string,
  name: ?string,
  args: []string,
  env: [string]string,
  fd_numbers: ?[]int,
  die_with_client: ?bool,
  detach: ?bool
) -> (
  event: string,
  id: string,
  layers: ?[]object,
  tty: ?bool,
  die_with_parent: ?bool,
  notices: ?[]string,
  pid: ?int,
  status: ?int
)

# The instances the daemon knows: the running ones in start order, after
# (with all) the recently ended ones, oldest first. id, name, state
# ("starting", "running" or "exited"), started (seconds since the epoch),
# pid (the main command's, null when not running), command (its argv),
# layers (as in Run's "started" reply; left out with brief, which is what a
# listing of many instances wants: about 2 KB each), layer_count and status
# (once exited: the main command's exit status, 128+N for signal N; null if
# unknown) and ended (when it ended, seconds since the epoch); cause, when a
# limit ended it ("out of memory: ..."); usage, while it runs with cgroup
# limits: what its outermost limited layer uses now (memory and pids, bytes
# and processes; cpu_usec, CPU time so far), and in layers, each limited
# layer's cgroup, limits (cgroup file: value) and usage. Ended ones are
# kept across daemon restarts (the last 100, in $XDG_STATE_HOME/bbl). With
# id, only the running instance it names (an id, a unique prefix of one, or
# a name only one has; else NoSuchInstance or AmbiguousInstance).
method List(all: ?bool, brief: ?bool, id: ?string) -> (instances: []Instance)

type Instance (
  id: string,
  name: string,
  state: string,
  started: float,
  pid: ?int,
  command: []string,
  layers: ?[]object,
  layer_count: int,
  status: ?int,
  ended: ?float,
  single_instance: bool,
  cause: ?string,
  usage: ?object
)

# Instances starting and ending, as it happens, until the caller hangs up.
# Call it with "more"; every reply is one event: "started" or "exited" (with
# the instance's status), its id, name and time (seconds since the epoch).
method Events() -> (
  event: string,
  id: string,
  name: string,
  time: float,
  status: ?int
)

# Send a signal to a running instance (id, or a name only one running
# instance has): its main command gets SIGTERM, SIGINT, SIGHUP, SIGUSR1 and
# SIGUSR2 through its layer's supervisor, as bubblewrap's command would; any
# other signal goes to layer 1 (SIGKILL ends every layer); with pid, the
# process Exec started instead. Signal 0 sends nothing: the instance runs
# (else NoSuchInstance).
method Signal(id: string, signal: int, pid: ?int) -> ()

# SIGTERM to the main command (and when it ignores SIGTERM and was started
# on a terminal, as an interactive shell is, a hangup of that terminal:
# SIGHUP to its session); once timeout seconds (default 10) pass, SIGKILL
# to layer 1, which takes every layer below it along. Returns when the
# instance has ended, with its status, and killed: whether SIGKILL was needed.
method Stop(id: string, timeout: ?float) -> (status: ?int, killed: ?bool)

# Run a command in a layer of a running instance (default: the layer of the
# main command) with exactly that layer's namespaces, uid/gid, capabilities,
# no_new_privs, seccomp filter, environment and working directory. Call it
# with "more". Without tty, three fds travel with the call: stdin, stdout,
# stderr. With tty, none: the command gets a new pty from the layer's own
# devpts, the "started" reply carries the pty's master (SCM_RIGHTS), and an
# empty argv means an interactive shell. Replies: event "started" (pid: the
# command's host pid), then event "exited" (status). The command is killed
# if the caller's connection ends.
method Exec(
  id: string,
  argv: []string,
  layer: ?string,
  tty: ?bool
) -> (
  event: string,
  pid: ?int,
  status: ?int
)

# Hand arguments to a running instance, the way its spec's send_args says
# (default: its main program runs again in its main layer with them, as a
# desktop app's own single-instance logic expects). Three fds travel with the
# call: stdin, stdout, stderr. Replies as Exec's.
method SendArgs(id: string, args: []string) -> (
  event: string,
  pid: ?int,
  status: ?int
)

# Show the app's own terminal: the pty its main command was started on,
# which the instance's monitor holds from the start to the end (whether or
# not a client shows it). Call it with "more". The "started" reply carries
# this client's end of a SOCK_SEQPACKET socket (SCM_RIGHTS), each packet a
# tag byte and its payload: the client sends "i" + input and "w" + struct
# winsize; it receives "o" + output (first the last 64 KiB the app wrote)
# and "n" + why it was let go. One client at a time: a new Attach takes the
# terminal over, and the previous client gets an "n" packet and its end.
# Closing the socket detaches: the app goes on. Replies: event "started"
# (pid: the main command's), then event "exited" (status) when the instance
# ends. NoTerminal if the app was not started on a terminal.
method Attach(id: string) -> (
  event: string,
  pid: ?int,
  status: ?int
)

# The command could not be started in the layer (no such layer, no such
# program, no pty); exit_code is 2 for what the caller can fix, else 1.
error ExecFailed (message: string, exit_code: int)

# The app has no terminal to attach to: it was not started on one (a start
# without a terminal and without --detach), or its terminal has closed.
error NoTerminal (id: string, message: string)

# No running instance has this id, name or id prefix.
error NoSuchInstance (id: string)

# More than one running instance has this name, or an id that begins so:
# candidates are "ID NAME" of each, in start order.
error AmbiguousInstance (id: string, candidates: []string)

# The sandbox did not start: nothing of it runs. exit_code is 2 when the
# spec is invalid or does not fit this machine, else 1 (always 1 for a
# bubblewrap command line, as bubblewrap). reported: the caller's stderr has
# the message already (see Run). fields: what the engine knows of the failure
# (what: "source-missing", "mkdir", "symlink", "chdir", "exec" or
# "namespaces"; where, path, strerror, command, and message: its words
# without layer and place), for front ends that word it their own way.
error StartFailed (
  message: string,
  exit_code: int,
  reported: ?bool,
  fields: ?[string]string
)

# The caller may not talk to the daemon: it runs under another uid, or it is
# the daemon's user inside a sandbox (sandboxed: other user or mount
# namespaces than the daemon's), where bbld does not serve: anything that
# talks to it could start programs with the host's view. reason says which,
# in one line. The daemon closes the connection after this error.
error PermissionDenied (uid: int, sandboxed: bool, reason: string)

# A message could not be understood: not JSON, not a call, or larger than
# the limit; or it took too long to arrive, or the daemon holds too much
# unfinished input of its clients (docs/api.md, "Limits"). The daemon closes
# the connection after this error.
error InvalidMessage (reason: string)

# The daemon serves as many connections as it may (a quarter of its fd
# limit), each with a call in progress. It closes this one after the error.
error Busy (reason: string)

# A bug in the daemon kept it from serving the call; its log says more. The
# connection goes on.
error InternalError (message: string)
"""

INTERFACES = {"org.varlink.service": SERVICE_INTERFACE, "io.bbl.Manager": MANAGER_INTERFACE}


class Call(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    method: str
    parameters: dict[str, Any] = {}
    oneway: bool = False
    more: bool = False
    upgrade: bool = False


class Reply(msgspec.Struct, omit_defaults=True):
    parameters: dict[str, Any] = {}
    continues: bool = False
    error: str | None = None


class VarlinkError(Exception):
    """An error reply: a qualified error name and its parameters."""

    def __init__(self, name: str, **parameters):
        super().__init__(name)
        self.name = name
        self.parameters = parameters

    def reply(self) -> Reply:
        return Reply(parameters=self.parameters, error=self.name)


class InvalidMessage(VarlinkError):
    def __init__(self, reason: str):
        super().__init__("io.bbl.Manager.InvalidMessage", reason=reason)


_encoder = msgspec.json.Encoder()
_call_decoder = msgspec.json.Decoder(Call)
_reply_decoder = msgspec.json.Decoder(Reply)


def encode(message: Call | Reply) -> bytes:
    return _encoder.encode(message) + b"\0"


def decode_call(frame: bytes) -> Call:
    try:
        call = _call_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise InvalidMessage(f"not a varlink call: {exc}") from None
    if "." not in call.method:
        raise InvalidMessage(f"method {call.method!r} is not qualified by an interface")
    return call


def decode_reply(frame: bytes) -> Reply:
    try:
        return _reply_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidMessage(f"not a varlink reply: {exc}") from None


def fds_from_ancillary(ancdata) -> list[int]:
    """The fds of SCM_RIGHTS records (recvmsg's ancillary data)."""
    import array
    import socket

    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


class Framer(channel.Framer):
    """bbld's: an oversized message is an InvalidMessage (it ends the connection)."""

    def feed(self, data: bytes) -> list[bytes]:
        try:
            return super().feed(data)
        except channel.FrameTooLarge as exc:
            raise InvalidMessage(str(exc)) from None
