"""What layers tell the engine's caller while an instance starts.

Every layer supervisor shares one end of a SOCK_SEQPACKET socketpair; the caller holds the
other. A report is a small msgspec-encoded message; `Built` carries a pidfd of the reporting
supervisor (SCM_RIGHTS), so the caller identifies it without trusting a pid number. Reports
are data: the receiver checks the layer name and the message type, and nothing else.
"""

from __future__ import annotations

import msgspec

from bbld import channel

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


class MainEnded(msgspec.Struct, tag=True):
    """The instance's main command has ended with `status`: the whole tree ends with it.
    Said at once, so the caller need not wait for every layer to end in turn."""
    layer: str
    status: int


Report = Built | Running | Failed | MainEnded
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
    (2 for what the caller can fix)."""
    message: str
    exit_code: int = 1


class Joined(msgspec.Struct, tag=True):
    """exec/attach: the joiner is in the layer's namespaces (with the command's pidfd and the
    command's own channel)."""


class Terminal(msgspec.Struct, tag=True):
    """attach: the pty the command made inside the layer (its master)."""


Step = CommandFailed | Joined | Terminal
_step_decoder = msgspec.msgpack.Decoder(Step)


def failure(message: str, exit_code: int = 1) -> bytes:
    return _encoder.encode(CommandFailed(message=message[:MAX_REPORT // 2], exit_code=exit_code))


def step(message: Joined | Terminal) -> bytes:
    return _encoder.encode(message)


def read_step(data: bytes) -> Step:
    """What a command said; anything unreadable is a failure of its own."""
    try:
        return _step_decoder.decode(data)
    except msgspec.DecodeError:
        return CommandFailed(message="a command said something unreadable before its exec")
