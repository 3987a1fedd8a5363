"""What bbld, its forker and the monitors say to each other (bbld.monitors.forker,
bbld.monitors.monitor, bbld.monitors.control). No trio, no engine."""

import re

import msgspec

INSTANCE_ID = re.compile(r"[0-9a-f]{8,32}")  # ids become file names: nothing else

MAX_REQUEST = 1 << 20
REQUEST_FDS = 5  # the instance's report channel, stdin, stdout, stderr, working directory
MAX_EXTRA_FDS = 56  # fds the spec names (bind-fd, data fds), placed at their numbers


class StartRequest(msgspec.Struct):
    id: str  # the instance id bbld gave it
    spec: str = ""  # JSON of a bbld.spec.Sandbox, or
    bwrap: list[str] | None = None  # a bubblewrap command line, interpreted by the monitor
    prog: str = "bbl-bwrap"  # (its program name, for usage messages)
    name: str | None = None  # (the instance's name, instead of "bwrap")
    args: list[str] = []
    env: dict[str, str] = {}
    fd_numbers: list[int] = []  # where the extra fds go in the monitor, in order
    hold_tty: bool = False  # keep the main command's pty in the monitor (a detached start)
    terminal: bool = False  # the caller relays a pty: an interactive command line gets one


class Event(msgspec.Struct, omit_defaults=True):
    """From an instance's monitor: started (with a pidfd per layer), failed, exited."""
    event: str
    name: str | None = None  # started: the sandbox's name,
    command: list[str] = []  # its main command (argv, with the call's args),
    started: float | None = None  # its start time (seconds since the epoch),
    main_pid: int | None = None  # and the main command's pid, if it still runs;
    tty: bool = False  # its pty master came with the event (after the monitor's pidfd)
    die_with_parent: bool = False  # the spec asks to end the instance with its caller
    reported: bool = False  # failed: the caller's stderr already has the message
    layers: list[dict] = []
    status: int | None = None
    message: str | None = None
    exit_code: int | None = None
    fields: dict[str, str] = {}  # failed: the engine's StartError fields (bbld.engine.errors)


# ---------------------------------------------------------------- an instance's control socket
# (bbld.monitors.control serves it in the monitor; bbld.daemon.registry calls it)

MAX_CONTROL = 1 << 20  # (an entry holds the main command's argv: it may be long)
CONTROL_FDS = 3


class ControlRequest(msgspec.Struct, forbid_unknown_fields=True):
    op: str  # status, watch, signal, exec, send-args, attach
    signal: int = 0
    pid: int | None = None
    layer: str | None = None
    argv: list[str] = []
    args: list[str] = []  # send-args: the arguments; the instance's spec says how they go in
    tty: bool = False
    hangup: bool = False  # signal: also hang up the app's terminal if the app ignores it


class ControlReply(msgspec.Struct, omit_defaults=True):
    op: str  # status, exited, ok, started, error
    entry: dict | None = None
    pid: int | None = None
    status: int | None = None
    message: str | None = None
    exit_code: int | None = None
    parameter: str | None = None  # error: the request's field that was wrong


_reply_decoder = msgspec.json.Decoder(ControlReply)


def decode_reply(data: bytes) -> ControlReply:
    return _reply_decoder.decode(data)
