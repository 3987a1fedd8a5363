"""Identity and privilege: uid/gid maps, capability sets, no_new_privs, seccomp."""

from __future__ import annotations

import errno
import os

from bbld import spec
from bbld.engine import syscalls as sc
from bbld.engine.errors import StartError


def default_map(inside: int | None, outside: int) -> list[spec.IdMap]:
    return [spec.IdMap(inside=outside if inside is None else inside, outside=outside)]


def write_id_maps(proc_fd: int, pid: int, layer: spec.Layer, uid: int, gid: int) -> None:
    """Write a new user namespace's maps from its parent, through the parent's own procfs.

    The parent writes (not the child) so that the files are reached through a procfs the
    parent opened and verified, never through a view the sandbox could have changed.
    """
    uid_map = layer.uid_map or default_map(layer.uid, uid)
    gid_map = layer.gid_map or default_map(layer.gid, gid)
    for name, text in (("setgroups", "deny"), ("uid_map", _map_text(uid_map)),
                       ("gid_map", _map_text(gid_map))):
        try:
            fd = os.open(f"{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc_fd)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise StartError(f"writing {name} {text.strip()!r}: {exc.strerror}") from None


def _map_text(mapping: list[spec.IdMap]) -> str:
    return "".join(f"{m.inside} {m.outside} {m.count}\n" for m in mapping)


def become(layer: spec.Layer) -> None:
    """In a command about to exec: switch to the layer's uid/gid if the maps did not already
    put the process there (with explicit multi-id maps). Capabilities are set afterwards."""
    try:
        if layer.gid is not None and os.getgid() != layer.gid:
            os.setresgid(layer.gid, layer.gid, layer.gid)
        if layer.uid is not None and os.getuid() != layer.uid:
            sc.prctl(sc.PR_SET_KEEPCAPS, 1)
            os.setresuid(layer.uid, layer.uid, layer.uid)
    except OSError as exc:
        raise StartError(f"cannot switch to uid {layer.uid} gid {layer.gid}: "
                         f"{exc.strerror}") from None


def assert_user_namespaces_denied() -> None:
    """bubblewrap's --assert-userns-disabled: refuse to run if a user namespace can be made
    here (the probe's namespace, if made, dies with this process)."""
    try:
        sc.unshare(sc.CLONE_NEWUSER)
    except OSError:
        return
    raise StartError("creation of new user namespaces was not disabled as requested")


def settle_supervisor(layer: spec.Layer) -> bool:
    """With explicit maps, a supervisor's own host id may be left unmapped, which leaves it no
    identity to create files with. It becomes id 0 inside when that is mapped, else the
    layer's ids, keeping its capabilities. Returns True if ids changed."""
    targets = []
    for mapping, own in ((layer.gid_map, layer.gid), (layer.uid_map, layer.uid)):
        if mapping is None:
            targets.append(None)  # the default map already placed us
        else:
            targets.append(0 if any(m.inside == 0 for m in mapping) else own)
    gid, uid = targets
    if (gid is None or gid == os.getgid()) and (uid is None or uid == os.getuid()):
        return False
    permitted = sc.capget_permitted()
    sc.prctl(sc.PR_SET_KEEPCAPS, 1)
    if gid is not None:
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)
    sc.capset(permitted, permitted, 0)  # leaving uid 0 cleared the effective set
    return True


def cap_last() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(spec.CAPABILITIES) - 1


def restrict_capabilities(keep: frozenset[int], cap_last: int, ambient: bool = True) -> None:
    """Leave exactly `keep` in the bounding, permitted and effective sets, and with `ambient`
    in the inheritable and ambient sets too (else those are left empty: only a uid-0 command
    keeps capabilities across execve)."""
    permitted = sc.capget_permitted()
    if permitted:  # after a switch away from uid 0 the effective set is empty: refill it
        sc.capset(permitted, permitted, 0)
    for cap in range(cap_last + 1):
        if cap in keep:
            continue
        try:  # (one call, not a read and a drop: dropping what is not there does nothing)
            sc.prctl(sc.PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno == errno.EINVAL or not sc.prctl(sc.PR_CAPBSET_READ, cap):
                continue  # unknown to this kernel, or not in the set: nothing to drop
            if exc.errno == errno.EPERM and not keep and permitted == 0:
                break  # holds nothing and, with no_new_privs, can never gain anything
            raise StartError(f"cannot drop capability {spec.CAPABILITIES[cap]} from the "
                             f"bounding set: {exc.strerror}") from None
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    try:
        sc.capset(mask, mask, mask if ambient else 0)
    except OSError as exc:
        names = ", ".join(spec.CAPABILITIES[c] for c in sorted(keep))
        raise StartError(f"cannot keep capabilities {names}: the layer does not hold them "
                         f"({exc.strerror})") from None
    for cap in keep if ambient else ():  # so that they survive execve for a non-root uid
        sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)


def no_new_privs() -> None:
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)


def load_seccomp(programs: list[bytes]) -> None:
    for program in programs:
        sc.seccomp_load(program)
