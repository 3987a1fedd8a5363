"""Status for the engine's caller in bubblewrap's formats (its --info-fd and --json-status-fd).

Both describe layer 1: the pid (in the caller's pid namespace) of a process in its
namespaces that the caller may join (Instance._joinable_pid) and the inode numbers of the
namespaces layer 1 created, in bubblewrap's order and names; the mount namespace always, the
user namespace never.
"""

from __future__ import annotations

import os

from bbld.engine import namespaces

# bubblewrap's order; its keys are the /proc/PID/ns names ("mnt-namespace")
NAMESPACES = tuple((name, namespaces.LINK[name]) for name in ("cgroup", "ipc", "mount", "net",
                                                                "pid", "uts"))


def _fields(layer, pid: int, inodes: dict[str, int]) -> list[str]:
    """`"key": value` pairs; keys are fixed ASCII words, values integers."""
    fields = [f'"child-pid": {pid}']
    for name, link in NAMESPACES:
        if (name in layer.namespaces or name == "mount") and link in inodes:
            fields.append(f'"{link}-namespace": {inodes[link]}')
    return fields


def started(sandbox, pid: int, inodes: dict[str, int]) -> None:
    """Write the --info-fd document (then close it) and the first --json-status-fd line."""
    fields = _fields(sandbox.layer, pid, inodes)
    if sandbox.info_fd is not None:
        body = ",\n".join(f"    {field}" for field in fields)
        _write(sandbox.info_fd, f"{{\n{body}\n}}\n")
        os.close(sandbox.info_fd)
    if sandbox.json_status_fd is not None:
        _write(sandbox.json_status_fd, f"{{ {', '.join(fields)} }}\n")


def exited(sandbox, status: int) -> None:
    """The last --json-status-fd line, then close it."""
    if sandbox.json_status_fd is not None:
        _write(sandbox.json_status_fd, f'{{ "exit-code": {status} }}\n')
        os.close(sandbox.json_status_fd)


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass  # a reader that went away does not stop the sandbox
