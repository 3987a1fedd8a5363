"""Who is at the other end of a unix socket: the check bbld and every instance's monitor make
on each connection before they read a byte of it. No trio, no engine.

Anything that can talk to bbld can run programs as the user with the host's view: the socket
*is* the user. A sandbox that merely sees the socket file (a `--ro-bind / /` sandbox does) must
not get through, so a peer must have the daemon's uid *and* live in the daemon's own user and
mount namespaces: the user's session, not a sandbox of any kind (BBL's, bubblewrap's,
Flatpak's, a rootful container's, which has no user namespace but a mount namespace of its own).

The peer is identified by a pidfd, never by a pid number that may be reused meanwhile:

- Linux 6.5 and later: the kernel hands out a pidfd of the socket's peer (SO_PEERPIDFD); its
  namespaces come from PIDFD_GET_USER_NAMESPACE / PIDFD_GET_MNT_NAMESPACE (6.11), or else from
  /proc/PID/ns/ read while the pidfd pins the process, which must still be alive afterwards
  (a pid is not reused while its process exists, zombie or not).
- Older kernels: SO_PEERCRED's pid, opened as a pidfd and read the same way; that pid could
  have been reused by another process between the connect and now, so the process must also
  hold the other end of this very connection (its fds against the peer inode sock_diag names):
  a process that took over a reused pid holds no such socket.

Whatever cannot be established refuses the peer (fails closed): a peer that has exited, one
that is not dumpable (its namespaces cannot be read), one that handed its end elsewhere.
"""

import errno
import fcntl
import os
import sys

try:  # the C modules: the client imports this too, and socket and signal import enum and re
    import _signal as signal
    import _socket as socket
except ImportError:  # not CPython
    import signal
    import socket

SO_PEERPIDFD = 77  # Linux 6.5
PIDFD_GET_MNT_NAMESPACE = 0xFF03  # _IO(0xFF, 3), Linux 6.11
PIDFD_GET_USER_NAMESPACE = 0xFF09  # _IO(0xFF, 9)
NAMESPACES = (("user", PIDFD_GET_USER_NAMESPACE), ("mnt", PIDFD_GET_MNT_NAMESPACE))


class Refused(Exception):
    """The peer may not talk to us; `reason` says why in one line, `sandboxed` whether it is
    the user's own uid in other namespaces (a sandbox)."""

    def __init__(self, uid: int, reason: str, sandboxed: bool = False):
        super().__init__(reason)
        self.uid, self.reason, self.sandboxed = uid, reason, sandboxed


Identity = dict[str, tuple[int, int]]  # namespace name -> (st_dev, st_ino) of its nsfs file


def own_namespaces() -> Identity:
    """This process's user and mount namespaces: what a peer must share. Taken once at start,
    before anything could move the process elsewhere (a monitor may join another user
    namespace for a bubblewrap --userns)."""
    return {name: _identity(os.stat(f"/proc/self/ns/{name}")) for name, _ in NAMESPACES}


def check(sock, home: Identity, peer: str = "the caller", us: str = "bbld") -> None:
    """Raise Refused unless the peer is our uid in the namespaces `home` names. `peer` and
    `us` name the two ends in the reason (bbld checks its callers, the client its daemon)."""
    pid, uid, _gid = _peer_credentials(sock)
    if uid != os.getuid():
        raise Refused(uid, f"{peer} runs as uid {uid}, not as {us}'s user")
    try:
        found = _peer_namespaces(sock, pid)
    except OSError as exc:
        raise Refused(uid, f"{peer}'s namespaces cannot be verified "
                           f"({exc.strerror or exc})") from None
    for name, identity in home.items():
        if found.get(name) != identity:
            raise Refused(uid, f"{peer} runs in another {_WHAT[name]} than {us}",
                          sandboxed=True)


_WHAT = {"user": "user namespace", "mnt": "mount namespace"}


def _peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer (SO_PEERCRED); plain and trio sockets."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)  # struct ucred
    return tuple(int.from_bytes(raw[i:i + 4], sys.byteorder, signed=True) for i in (0, 4, 8))


def _peer_namespaces(sock, pid: int) -> Identity:
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
        return _namespaces_by_pid(sock, pid)  # before Linux 6.5
    try:
        return namespaces_of_pidfd(pidfd)
    finally:
        os.close(pidfd)


def namespaces_of_pidfd(pidfd: int) -> Identity:
    """The user and mount namespaces of the process `pidfd` refers to."""
    try:
        return {name: _ioctl_identity(pidfd, request) for name, request in NAMESPACES}
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EINVAL):  # before Linux 6.11
            raise
    return _namespaces_through_proc(pidfd, _pidfd_pid(pidfd))


def _ioctl_identity(pidfd: int, request: int) -> tuple[int, int]:
    fd = fcntl.ioctl(pidfd, request)
    try:
        return _identity(os.fstat(fd))
    finally:
        os.close(fd)


def _namespaces_through_proc(pidfd: int, pid: int) -> Identity:
    """Read /proc/PID/ns while `pidfd` pins the process: it must still be alive afterwards,
    so that PID was its number throughout."""
    found = {name: _identity(os.stat(f"/proc/{pid}/ns/{name}")) for name, _ in NAMESPACES}
    signal.pidfd_send_signal(pidfd, 0)  # ProcessLookupError (an OSError) if it has exited
    return found


def _namespaces_by_pid(sock, pid: int) -> Identity:
    """Without SO_PEERPIDFD: the pid SO_PEERCRED names, which must hold our peer's socket."""
    pidfd = os.pidfd_open(pid)
    try:
        peer_inode = _unix_peer_inode(os.fstat(sock.fileno()).st_ino)
        holds = False
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                holds = os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{peer_inode}]"
            except OSError:
                continue
            if holds:
                break
        if not holds:
            raise OSError(errno.ESRCH, "the connecting process no longer holds the connection")
        return _namespaces_through_proc(pidfd, pid)
    finally:
        os.close(pidfd)


# sock_diag (netlink) for AF_UNIX: the inode of a socket's peer
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST = 4, 20, 1
_UDIAG_SHOW_PEER, _UNIX_DIAG_PEER, _NLMSG_ERROR = 0x4, 2, 2


def _unix_peer_inode(inode: int) -> int:
    import struct  # (old kernels only)

    request = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode,
                          _UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)  # any state, no cookie
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1,
                         0)
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         _NETLINK_SOCK_DIAG)
    try:
        diag.send(header + request)
        reply = diag.recv(8192)
    finally:
        diag.close()
    kind = struct.unpack_from("=H", reply, 4)[0]
    if kind == _NLMSG_ERROR:
        error = -struct.unpack_from("=i", reply, 16)[0]
        raise OSError(error, os.strerror(error))
    offset = 16 + 16  # nlmsghdr, unix_diag_msg; then attributes (4-byte aligned)
    while offset + 4 <= len(reply):
        length, attribute = struct.unpack_from("=HH", reply, offset)
        if attribute == _UNIX_DIAG_PEER and length >= 8:
            return struct.unpack_from("=I", reply, offset + 4)[0]
        offset += max(4, (length + 3) & ~3)
    raise OSError(errno.ENOTCONN, "the connection has no peer")


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid > 0:
                    return pid
    raise OSError(errno.ESRCH, "the process has exited or is not visible here")


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino
