"""bbld's log: one line per event on stderr (the journal under systemd, the autostart's log
file otherwise), and never a flood. Whatever a client or a sandbox can provoke (a reset
connection, a full fd table, a bug a hostile input found) is said at most BURST times in
WINDOW seconds, then once more with how many lines were left out. Text is escaped
(bbld.text.printable): a line is one line."""

import sys
import time
import traceback

from bbld.text import printable

WINDOW, BURST = 10.0, 20


class _Budget:
    def __init__(self):
        self.start, self.said, self.left_out = 0.0, 0, 0

    def take(self) -> bool:
        now = time.monotonic()
        if now - self.start >= WINDOW:
            if self.left_out:
                _write(f"({self.left_out} more log lines were left out)")
            self.start, self.said, self.left_out = now, 0, 0
        if self.said < BURST:
            self.said += 1
            return True
        self.left_out += 1
        return False


_budget = _Budget()


def say(message: str) -> None:
    if _budget.take():
        _write(printable(message))


def bug(where: str) -> None:
    """An unexpected exception (a bug): one line, then its traceback, within the budget."""
    if _budget.take():
        kind, value, _ = sys.exc_info()
        _write(printable(f"bug in {where}: {kind.__name__ if kind else '?'}: {value}"))
        traceback.print_exc(file=sys.stderr)


def _write(line: str) -> None:
    try:
        sys.stderr.write(f"bbld: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # no log to write to: bbld goes on
