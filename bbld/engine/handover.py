"""Supervisors that leave once their layer is built, and the layer that takes over from them.

plan._mark_idle_supervisors decides who leaves and who adopts. The adopter (the nearest
ancestor whose supervisor stays) makes a SOCK_SEQPACKET socketpair before it clones its
sub-layers; only the leaving layers below it get the sending end.

- A layer that steps aside (no pid namespace of its own) sends `HandOver` with its
  sub-layers' pids, then exits: the kernel reparents them to the adopter, which takes them
  over when it reaps the leaver (`Adoptions.adopt`).
- A layer that retires (pid 1 of its own pid namespace) sends `Retired` with a pidfd of its
  main sub-layer's supervisor, then becomes a minimal init: the adopter signals that
  sub-layer directly from then on and ends when it ends (`Adoptions.follow`).

Messages come only from our own supervisors (no sandboxed process holds the sending end);
they are still checked against the plan.
"""

from __future__ import annotations

import os
import socket

import msgspec
from msgspec import Struct

from bbld.engine.plan import LayerPlan


class HandOver(Struct, tag=True, array_like=True):
    """From a layer stepping aside, just before it exits: its sub-layers' pids (in the pid
    namespace it shares with the adopter)."""
    layer: str
    children: dict[str, int]


class Retired(Struct, tag=True, array_like=True):
    """From a retiring layer: its main sub-layer (sent with a pidfd of that sub-layer's
    supervisor). `init` false: no minimal init was found, its supervisor stays."""
    layer: str
    main: str | None
    init: bool


Message = HandOver | Retired
_decoder = msgspec.msgpack.Decoder(Message)


def send(fd: int, message: Message, fds: tuple[int, ...] = ()) -> None:
    """Best effort: when the adopter has ended, so has the tree."""
    sock = socket.socket(fileno=fd)
    try:
        socket.send_fds(sock, [msgspec.msgpack.encode(message)], list(fds))
    except OSError:
        pass
    finally:
        sock.detach()


class Adoptions:
    """What an adopter knows of the layers that leave towards it."""

    def __init__(self, plan: LayerPlan):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX,
                                              socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.sending_fd = theirs.detach()  # for the leaving sub-layers; closed once they have it
        self.plans = {node.name: node for node in plan.walk()}
        self.awaited = {node.name for node in plan.handed_over() if node.steps_aside}
        self.hand_overs: dict[str, dict[str, int]] = {}  # received, not yet taken over
        self.retirements: dict[str, tuple[str | None, int | None]] = {}  # main, its pidfd
        self.unclaimed: dict[int, int] = {}  # reaped pids not (yet) known: maybe adopted
        self.open = True  # until every sending end is closed

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> None:
        while self.open:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 1, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            if not data:  # every leaving layer has exited or became an init
                self.open = False
                self.awaited &= self.hand_overs.keys()
                return
            self._accept(data, fds)

    def _accept(self, data: bytes, fds: list[int]) -> None:
        try:
            message = _decoder.decode(data)
        except msgspec.DecodeError:
            message = None
        plan = self.plans.get(message.layer) if message is not None else None
        if isinstance(message, HandOver) and plan is not None and plan.steps_aside \
                and not fds:
            self.hand_overs[message.layer] = message.children
        elif isinstance(message, Retired) and plan is not None and plan.retires \
                and message.main in {None, *(child.name for child in plan.children)} \
                and len(fds) == (1 if message.init and message.main else 0):
            self.retirements[message.layer] = (message.main, fds[0] if fds else None)
        else:
            for fd in fds:
                os.close(fd)

    def pending(self, plan: LayerPlan | None) -> bool:
        """A signal for `plan` must wait: it is leaving and has not said where its main is."""
        if plan is None:
            return False
        if plan.steps_aside:
            return plan.name in self.awaited
        return plan.retires and self.open and plan.name not in self.retirements

    def adopt(self, reaped: list[tuple[int, int]], children: dict[int, LayerPlan],
              commands: set[int], main_pid: int | None
              ) -> tuple[list[tuple[int, int]], int | None]:
        """Take over the sub-layers of children that stepped aside (`children` changes).
        Returns what is left of `reaped` for the usual bookkeeping, and the main's pid. A
        sub-layer may end before its adoption is known: unknown pids wait in `unclaimed`
        until every awaited HandOver has arrived."""
        self.receive()
        pending = {**self.unclaimed, **dict(reaped)}
        self.unclaimed = {}
        stepped = [pid for pid in pending
                   if pid in children and children[pid].name in self.hand_overs]
        while stepped:
            pid = stepped.pop()
            del pending[pid]
            plan = children.pop(pid)
            handed = self.hand_overs.pop(plan.name)
            self.awaited.discard(plan.name)
            below = {child.name: child for child in plan.children}
            for name, child_pid in handed.items():
                if name not in below:
                    continue
                children[child_pid] = below[name]
                if child_pid in pending and name in self.hand_overs:
                    stepped.append(child_pid)
            if pid == main_pid:
                main_pid = handed.get(plan.main_child.name) if plan.main_child else None
        left = []
        for pid, status in pending.items():
            if pid in children or pid in commands or pid == main_pid or not self.awaited:
                left.append((pid, status))
            else:
                self.unclaimed[pid] = status
        return left, main_pid

    def follow(self, main: LayerPlan | None) -> tuple[LayerPlan, int] | None:
        """When `main` has retired into an init: the sub-layer to follow instead (its main),
        with a pidfd of its supervisor; further down while that one retired too."""
        followed = None
        while main is not None and main.name in self.retirements:
            name, pidfd = self.retirements.pop(main.name)
            if pidfd is None:
                break  # its supervisor stays: signal it as before
            if followed is not None:
                os.close(followed[1])
            main = self.plans[name]
            followed = (main, pidfd)
        return followed
