"""What layers tell the engine's caller while an instance starts.

Every layer supervisor shares one end of a SOCK_SEQPACKET socketpair; the caller holds the
other. A report is a small msgspec-encoded message; `Built` carries a pidfd of the reporting
supervisor (SCM_RIGHTS), so the caller identifies it without trusting a pid number. Reports
are data: the receiver checks the layer name and the message type, and nothing else.
"""

from __future__ import annotations

import msgspec

from bbld import channel
from bbld.engine.errors import FIELDS, StartError

MAX_REPORT = 4096
MAX_REPORT_FDS = 16


class Built(msgspec.Struct, tag=True):
    """The layer's namespaces and filesystem are ready; its sub-layers are being built.

    Sent with the supervisor's pidfd, then one fd per name in `namespace_fds`, opened from
    /proc/self/ns by the supervisor itself: the caller can enter the layer later (exec,
    attach) although the supervisor is not dumpable. A layer built by its parent's process
    (LayerPlan.inline) has no process: no pidfd."""
    layer: str
    namespaces: dict[str, int]
    namespace_fds: list[str] = []
    process: bool = True


class Running(msgspec.Struct, tag=True):
    """The layer's commands have been executed."""
    layer: str


class Failed(msgspec.Struct, tag=True):
    layer: str
    message: str
    exit_code: int = 1
    fields: dict[str, str] = {}  # StartError's, for front ends that word it their own way


class MainEnded(msgspec.Struct, tag=True):
    """The instance's main command has ended with `status`: the whole tree ends with it.
    Said at once, so the caller need not wait for every layer to end in turn."""
    layer: str
    status: int


Report = Built | Running | Failed | MainEnded


class StartRules:
    """What layers may say, as a state machine without I/O (h11's way): feed it each report
    and the number of fds that came with it; it answers None (the report is accepted: the
    engine's caller acts on it, and takes its fds as the report's kind says) or why the
    report breaks the rules (the start fails). Reports are data from processes below us:
    a known layer name, `Built` once per layer with exactly its fds (a pidfd unless built by
    its parent's process, then one namespace fd per distinct name), `Running` only after
    that layer's `Built` (with the main command's pidfd and pty, at most two fds),
    `MainEnded` only from the main command's layer and without fds. The fds themselves (that
    each namespace fd is the namespace named) are checked by the caller, which holds them."""

    def __init__(self, layers, main: str):
        self.layers, self.main = set(layers), main
        self.built: set[str] = set()
        self.running: set[str] = set()

    def judge(self, report: Report, fds: int) -> str | None:
        name = report.layer
        if name not in self.layers:
            return f"report about an unknown layer {name!r}"
        if isinstance(report, Failed):
            return None
        if isinstance(report, Built):
            expected = (1 if report.process else 0) + len(report.namespace_fds)
            if name in self.built or fds != expected or \
                    len(set(report.namespace_fds)) != len(report.namespace_fds):
                return "unexpected report Built"
            self.built.add(name)
            return None
        if isinstance(report, MainEnded):
            return None if name == self.main and fds == 0 else "unexpected report MainEnded"
        if name in self.built and fds <= 2:  # Running
            self.running.add(name)
            return None
        return f"unexpected report {type(report).__name__}"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Report)


def send(sock, report: Report, fds: tuple[int, ...] = ()) -> None:
    channel.send(sock, _encoder.encode(report)[:MAX_REPORT], fds)


def receive(sock) -> tuple[Report | None, list[int]]:
    """One report (None at end of stream). Raises ValueError for malformed data (more fds
    than a report takes included: bbld.channel.Truncated)."""
    data, fds = channel.receive(sock, MAX_REPORT, MAX_REPORT_FDS)
    if not data:
        channel.close_all(fds)
        return None, []
    try:
        return _decoder.decode(data), fds
    except msgspec.DecodeError as exc:
        channel.close_all(fds)
        raise ValueError(f"unreadable report: {exc}") from None


# ---------------------------------------------------------------- a command's last steps
# A command forked to exec (a layer's, or one exec/attach enters a layer with) says on a
# channel of its own what happened before its execve: nothing (the channel closes at exec),
# or why it failed. Entering a layer says two more things first.


class CommandFailed(msgspec.Struct, tag=True):
    """The command could not be readied or executed: why, and the exit status that gives
    (2 for what the caller can fix), with the StartError's fields."""
    message: str
    exit_code: int = 1
    fields: dict[str, str] = {}


class Joined(msgspec.Struct, tag=True):
    """exec/attach: the joiner is in the layer's namespaces (with the command's pidfd and the
    command's own channel)."""


class Terminal(msgspec.Struct, tag=True):
    """attach: the pty the command made inside the layer (its master)."""


Step = CommandFailed | Joined | Terminal
_step_decoder = msgspec.msgpack.Decoder(Step)


def failure(exc: BaseException) -> bytes:
    """What a command says of why it did not get to exec (a bug is said as one)."""
    if not isinstance(exc, StartError):
        exc = StartError(f"internal error: {exc!r}")
    return _encoder.encode(CommandFailed(message=exc.message[:MAX_REPORT // 4],
                                         exit_code=exc.exit_code, fields=exc.fields()))


def failed_command(said: Step) -> StartError:
    """The StartError a command's (or an entering process's) failure stands for."""
    if not isinstance(said, CommandFailed):
        return StartError(f"a command said {type(said).__name__} where it should have failed")
    fields = {name: value for name, value in said.fields.items() if name in FIELDS}
    return StartError(said.message, said.exit_code, **fields)


def step(message: Joined | Terminal) -> bytes:
    return _encoder.encode(message)


def read_step(data: bytes) -> Step:
    """What a command said; anything unreadable is a failure of its own."""
    try:
        return _step_decoder.decode(data)
    except msgspec.DecodeError:
        return CommandFailed(message="a command said something unreadable before its exec")
