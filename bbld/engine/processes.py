"""Signals and reaping, for every process of the engine that has children: a supervisor, the
engine's caller (bbld.engine.instance). Signals are read from a signalfd (no handlers, so a
signal never interrupts a step half-done); children are found in /proc, never guessed."""

import os
import signal

from bbld.engine import syscalls as sc

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2)
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SI_KERNEL = 0x80  # si_code of signals the kernel sends, e.g. Ctrl-C on a terminal


def block_signals() -> int:
    """Block the supervised signals and return a signalfd that receives them."""
    signals = (*FORWARDED_SIGNALS, signal.SIGCHLD)
    sc.set_signal_mask(signal.SIG_BLOCK, signals)
    return sc.signalfd(signals)


def read_signals(sigfd: int) -> list[tuple[int, int, int]]:
    """Pending (signo, si_code, sender pid) tuples, in arrival order."""
    found = []
    while True:
        try:
            raw = os.read(sigfd, sc.SIGNALFD_SIGINFO_SIZE * 16)
        except BlockingIOError:
            return found
        for offset in range(0, len(raw), sc.SIGNALFD_SIGINFO_SIZE):
            found.append(sc.parse_signalfd_siginfo(raw[offset:offset + sc.SIGNALFD_SIGINFO_SIZE]))


def exit_code(wait_status: int) -> int:
    """The shell's encoding: the exit code, or 128+N when killed by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def reap_all() -> list[tuple[int, int]]:
    """Reap every child that has ended (without waiting); their (pid, status)."""
    reaped = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def children(proc_fd: int) -> set[int] | None:
    """Our children's pids (zombies included); None if /proc does not say."""
    try:
        with open(os.open("thread-self/children", os.O_RDONLY, dir_fd=proc_fd)) as f:
            return {int(pid) for pid in f.read().split()}
    except OSError:
        return None


def kill_all_children(proc_fd: int) -> None:
    """SIGKILL every child, including orphans that reach us as a subreaper, and reap them."""
    while True:
        pids = children(proc_fd)
        if pids is None:
            return  # cannot see them: never block waiting for a child we did not kill
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
