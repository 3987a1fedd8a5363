"""Ended instances kept across daemon restarts (no trio, no engine): `STATE/bbl/history.jsonl`,
one JSON line per instance that ended, with the runtime directory it belongs to, so that two
daemons for two places (a test's, the user's) share the file without seeing each other's.
A daemon reads the last KEEP of its own at start; the file is cut back to KEEP lines per place
once it grows past a few hundred kilobytes. Written with O_APPEND (each line in one write)
and under a lock when cut back; never through a link."""

import fcntl
import json
import os

KEEP = 100
CUT_AT = 256 << 10  # bytes


class History:
    def __init__(self, path: str, runtime: str):
        self.path, self.runtime = path, runtime

    def load(self) -> list[dict]:
        """The last KEEP entries of this runtime directory, oldest first."""
        return [entry for entry in self._entries() if entry.get("runtime") == self.runtime
                ][-KEEP:]

    def add(self, entry: dict) -> None:
        line = json.dumps({**entry, "runtime": self.runtime}, separators=(",", ":")) + "\n"
        try:
            fd = self._open(os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # (a cut holds it exclusively)
                os.write(fd, line.encode())
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > CUT_AT:
                self._cut()
        except OSError:
            pass  # no history is no reason to fail anything

    def _cut(self) -> None:
        """Keep the last KEEP lines of each runtime directory."""
        fd = self._open(os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._entries(fd)
            kept, seen = [], {}
            for entry in reversed(entries):
                runtime = entry.get("runtime")
                seen[runtime] = seen.get(runtime, 0) + 1
                if seen[runtime] <= KEEP:
                    kept.append(entry)
            data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in reversed(kept))
            os.ftruncate(fd, 0)
            os.pwrite(fd, data.encode(), 0)
        finally:
            os.close(fd)

    def _open(self, flags: int) -> int:
        return os.open(self.path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)

    def _entries(self, fd: int | None = None) -> list[dict]:
        try:
            own = fd is None
            fd = self._open(os.O_RDONLY) if own else fd
            try:
                with os.fdopen(os.dup(fd), "rb") as f:
                    f.seek(0)
                    lines = f.read(4 * CUT_AT).splitlines()
            finally:
                if own:
                    os.close(fd)
        except OSError:
            return []
        entries = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn line: skipped
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                entries.append(entry)
        return entries
