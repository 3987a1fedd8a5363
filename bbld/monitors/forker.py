"""The forker: a single-threaded process with the engine imported once, that every monitor
is forked from (no new interpreter per instance).

bbld starts it once (`python -I -m bbld.monitors.forker FD INSTANCES_DIR`, see
bbld.daemon.forker_link) and sends start requests over a SOCK_SEQPACKET socket, each with its
file descriptors (SCM_RIGHTS): the instance's report channel, the caller's stdin, stdout,
stderr and working directory. The forker keeps one monitor forked ahead, a spare
(_spare), which takes the next request off that socket itself and becomes that instance's
monitor (bbld.monitors.monitor); the forker then forks the next spare. The namespace work
never happens in the daemon's event loop.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import time

import msgspec

from bbld import bwrap, channel, spec
from bbld.engine import Instance, prepare, seccomp
from bbld.messages import MAX_EXTRA_FDS, MAX_REQUEST, REQUEST_FDS, Event, StartRequest
from bbld.monitors import monitor


def main(fd: int, directory: str) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    sock = socket.socket(fileno=fd)
    _warm_up()
    failures = 0
    while failures < 3:  # (a spare that keeps dying would otherwise be forked forever)
        taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
        if os.fork() == 0:
            status = 1
            try:
                os.close(taken_r)
                status = _spare(sock, taken_w, directory)
            finally:
                os._exit(status)
        os.close(taken_w)
        said = os.read(taken_r, 256)
        os.close(taken_r)
        try:
            news = _news.decode(said) if said else None  # (nothing: the spare died)
        except msgspec.DecodeError:
            news = None
        if news is not None and not news.taken:
            return 0
        failures = 0 if news is not None else failures + 1
    return 1


class SpareNews(msgspec.Struct):
    """What a spare tells the forker on its pipe: it took a request (fork the next spare),
    or bbld's channel ended (the forker ends too). Nothing at all means it died."""
    taken: bool


_news = msgspec.json.Decoder(SpareNews)


def _spare(sock: socket.socket, taken_w: int, directory: str) -> int:
    """A monitor forked ahead of its request. It does a monitor's work once on sample
    requests while nothing waits for it, so that its copy-on-write faults (most of a fresh
    monitor's first milliseconds, see docs/performance.md) come before the request, then
    takes the next request off the daemon's socket itself and becomes that instance's
    monitor, after telling the forker to fork the next spare. Only the spare reads the
    socket: requests queue there while the next one is forked."""
    if not _pending(sock):  # (under a burst of requests, serve them cold rather than late)
        _rehearse()
    while True:  # (recv retries by itself when a signal interrupts it: PEP 475)
        try:
            data, fds = channel.receive(sock, MAX_REQUEST, REQUEST_FDS + MAX_EXTRA_FDS)
        except channel.Truncated:
            continue  # (bbld never sends more: nothing to answer)
        if not data:
            _tell(taken_w, SpareNews(taken=False))
            return 0
        if len(fds) >= REQUEST_FDS:
            break
        channel.close_all(fds)
    _tell(taken_w, SpareNews(taken=True))
    sock.close()  # (the daemon's channel to the forker: not the instance's)
    return monitor.run(data, fds, directory)


def _tell(taken_w: int, news: SpareNews) -> None:
    try:
        os.write(taken_w, msgspec.json.encode(news))
    except OSError:
        pass  # the forker is gone: bbld starts another for the next request
    os.close(taken_w)


def _pending(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except OSError:
        return True  # (let recv_fds say what it is)


def _rehearse() -> None:
    """Decode and plan sample requests as _monitor would (no namespace, file or process is
    made), touching the memory a real request will touch. A failure here only means a
    colder start."""
    try:
        for data in _SAMPLE_REQUESTS:
            request = monitor.request_decoder.decode(data)
            front = bwrap.FrontEnd(request.prog) if request.bwrap is not None else None
            sandbox = monitor.sandbox(request, front)
            Instance(prepare(sandbox, request.args), request.env)
            msgspec.json.encode(Event(event="started", name=sandbox.name, command=["x"],
                                      started=time.time(), layers=[{"name": "x"}]))
    except Exception:  # noqa: BLE001 (a rehearsal: the real request reports its own errors)
        pass


_SAMPLE_REQUESTS = [
    msgspec.json.encode(StartRequest(
        id="0" * 8, env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        bwrap=["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--proc", "/proc",
               "--dev", "/dev", "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent",
               "--new-session", "--setenv", "A", "b", "--chdir", "/", "true"])),
    msgspec.json.encode(StartRequest(id="0" * 8, env={"HOME": "/"}, spec=msgspec.json.encode({
        "name": "sample", "layer": {
            "name": "outer", "namespaces": ["user", "mount", "pid", "ipc", "uts"],
            "uid": 0, "gid": 0, "new_root": True,
            "fs": [{"op": "ro-bind", "src": "/usr", "dest": "/usr"},
                   {"op": "symlink", "target": "usr/bin", "dest": "/bin"},
                   {"op": "proc", "dest": "/proc"}, {"op": "dev", "dest": "/dev"},
                   {"op": "tmpfs", "dest": "/tmp"}],
            "env": {"set": {"A": "b"}}, "seccomp": {"policy": "default"},
            "layers": [{"name": "inner", "namespaces": ["user", "mount", "pid"], "uid": 1000,
                        "gid": 1000,
                        "fs": [{"op": "tmpfs", "dest": "/run"}],
                        "command": {"argv": ["true"], "cwd": "/"}}]}}).decode())),
]


def _warm_up() -> None:
    """Do once here what every forked monitor would otherwise do again: msgspec builds a
    type's decoding and encoding tables on first use (the spec's types: milliseconds), the
    default seccomp policy takes libseccomp a while to compile, and objects the collector
    visits would be copied into every child (copy-on-write).
    """
    spec.decode(b'{"layer": {"name": "warm", "command": {"argv": ["true"]}}}', "json")
    # a first bubblewrap command line costs a fresh monitor more than later ones
    bwrap.FrontEnd("bwrap").sandbox(["--ro-bind", "/", "/", "true"], {}, 0, 0, None)
    try:
        seccomp.compile_policy("default")
    except OSError:
        pass  # no libseccomp: the start that asks for a policy says so
    msgspec.json.encode(Event(event="exited", status=0))
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
