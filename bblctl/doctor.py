"""`bblctl doctor [--json]`: what BBL needs on this machine, a line each: ok, or what is
missing and the exact fix. Exit 0 when the core works (user namespaces, a runtime directory,
a daemon that answers or can be started), 1 otherwise; optional features only warn."""

import ctypes.util
import os
import shutil
import subprocess
import sys

from bblctl.cli import UsageError, parse
from bblctl.client import ClientError, connect, connect_at, running_daemon, sandboxed
from bbld import paths

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
# Programs optional features drive (docs/profiles.md): their absence only warns.
HELPERS = (("Xephyr", "xserver-xephyr", "gui = \"xephyr\""), ("xpra", "xpra", "gui = \"xpra\""),
           ("weston", "weston", "gui = \"weston\""),
           ("xdg-dbus-proxy", "xdg-dbus-proxy", "dbus = \"filtered\""),
           ("pasta", "passt", "net = \"nat\""), ("squashfuse", "squashfuse", "AppImages"))


def doctor(argv: list[str]) -> int:
    flags, _, positional = parse(argv, {"--json": False}, {})
    if positional:
        raise UsageError(f"doctor takes no arguments (got {positional[0]!r})")
    checks = [check for probe in PROBES for check in probe()]
    if flags["--json"]:
        import json

        print(json.dumps([dict(zip(("level", "what", "detail"), c, strict=True))
                          for c in checks], indent=2))
    else:
        for level, what, detail in checks:
            print(f"{level:4}  {what}: {detail}")
    return 1 if any(level == FAIL for level, _, _ in checks) else 0


def _user_namespaces():
    """Unprivileged user namespaces, tried for real in a child (unshare(2))."""
    code = "import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare(0x10000000))"
    tried = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=20)
    if tried.returncode == 0:
        return [(OK, "user namespaces", "an unprivileged process can make one")]
    fix = "sysctl -w user.max_user_namespaces=15000 (as root)"
    for path, value, knob in (
            ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
             "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (as root; Ubuntu), or "
             "an AppArmor profile that allows userns for python3"),
            ("/proc/sys/kernel/unprivileged_userns_clone", "0",
             "sysctl -w kernel.unprivileged_userns_clone=1 (as root)"),
            ("/proc/sys/user/max_user_namespaces", "0", fix)):
        if _read(path) == value:
            return [(FAIL, "user namespaces", f"{path} is {value}: {knob}")]
    if sandboxed():
        return [(FAIL, "user namespaces", "this process runs inside a sandbox that allows "
                 "no more: run bblctl doctor outside it")]
    return [(FAIL, "user namespaces", f"unshare(CLONE_NEWUSER) failed: {fix}")]


def _daemon():
    found = []
    runtime = paths.runtime_dir()
    try:
        paths.ensure_runtime_dir(runtime)
        found.append((OK, "runtime directory", runtime))
    except (paths.UnsafeDirectory, OSError) as exc:
        found.append((FAIL, "runtime directory", str(exc)))
        return found
    conn = running_daemon()
    if conn is None:
        try:
            with connect():  # (what any command would do: start it)
                pass
            conn = running_daemon()
        except ClientError as exc:
            return [*found, (FAIL, "bbld", f"{exc}")]
    with conn:
        facts = conn.call("io.bbl.Manager.Status")
    found.append((OK, "bbld", f"pid {facts['pid']}, version {facts['version']}, "
                              f"{facts['started_by']}, socket {facts['socket']}"))
    for other in _other_places(runtime):
        pid = _daemon_at(os.path.join(other, "bbld.sock"))
        if pid and pid != facts["pid"]:
            found.append((WARN, "a second bbld", f"pid {pid} serves {other} too, with "
                          "instances this one does not show: stop it (XDG_RUNTIME_DIR="
                          f"{os.path.dirname(other)} bblctl daemon stop) "))
    return found


def _other_places(runtime: str) -> list[str]:
    candidates = [f"/run/user/{os.getuid()}/bbl",
                  os.path.join(paths.home(), ".local", "state", "bbl", "run")]
    return [place for place in candidates if place != runtime]


def _daemon_at(path: str) -> int | None:
    try:
        conn = connect_at(path)
        if conn is None:
            return None
        with conn:
            return conn.call("io.bbl.Manager.Ping")["pid"]
    except ClientError:
        return None


def _units():
    unit = os.path.join(os.environ.get("XDG_CONFIG_HOME") or
                        os.path.join(paths.home(), ".config"), "systemd", "user",
                        "bbld.service")
    if not os.path.exists(unit):
        return [(INFO, "systemd units", "not installed; `bblctl setup` installs and enables "
                 "them (bblctl starts bbld on demand without them)")]
    with open(unit) as f:
        start = next((line.split("=", 1)[1].strip() for line in f
                      if line.startswith("ExecStart=")), "")
    program = start.split()[0] if start else ""
    if not os.access(program, os.X_OK):
        return [(FAIL, "systemd units", f"{unit}: ExecStart={start} is not executable; run "
                 "`bblctl setup` again with the bblctl of the install you use")]
    return [(OK, "systemd units", f"{unit}: ExecStart={start}")]


def _kernel_facilities():
    found = []
    seccomp = ctypes.util.find_library("seccomp")
    found.append((OK, "libseccomp", seccomp) if seccomp else
                 (WARN, "libseccomp", "missing: named seccomp policies (the template's app "
                  "layer) cannot load; apt install libseccomp2"))
    for device, use, fix in (("/dev/fuse", "AppImages (squashfuse)",
                              "chmod 0666 /dev/fuse (as root; desktop systems ship it so)"),
                             ("/dev/net/tun", "user-mode networking (pasta)",
                              "chmod 0666 /dev/net/tun (as root)")):
        if os.access(device, os.R_OK | os.W_OK):
            found.append((OK, device, f"usable, for {use}"))
        else:
            found.append((WARN, device, f"not usable by you, {use} needs it: {fix}"))
    return found


def _cgroup():
    """The daemon's delegated cgroup (BBL_CGROUP, or its own under systemd) and which of the
    controllers limits need it has."""
    conn = running_daemon()
    if conn is None:
        return []  # (_daemon said why)
    with conn:
        facts = conn.call("io.bbl.Manager.Status")
    if not facts.get("cgroup"):
        return [(INFO, "delegated cgroup", "none: profiles' limits.pids/memory/cpu/io_weight "
                 "are refused; run bbld as the systemd user service (`bblctl setup`), or set "
                 "BBL_CGROUP (docs/security.md, \"Resource limits\")")]
    have = facts.get("controllers") or []
    lacking = [c for c in ("pids", "memory", "cpu", "io") if c not in have]
    return [(OK if not lacking else WARN, "delegated cgroup", f"{facts['cgroup']}: "
             f"{' '.join(have) or 'no controllers'}" + (
                 f"; without {', '.join(lacking)}, the limits that need "
                 f"{'them' if len(lacking) > 1 else 'it'} are refused" if lacking else ""))]


def _session():
    found = []
    for name, what in (("DISPLAY", "X11 display"), ("WAYLAND_DISPLAY", "Wayland display"),
                       ("XAUTHORITY", "X11 authority file")):
        value = os.environ.get(name)
        found.append((INFO, what, f"{name}={value}" if value else f"{name} is not set"))
    found += _buses()
    found += _network()
    for program, package, feature in HELPERS:
        path = shutil.which(program)
        found.append((OK, program, path) if path else
                     (WARN, program, f"not installed ({feature} needs it): apt install "
                      f"{package}"))
    return found


def _buses():
    """The session and system bus, as `dbus = "host"`/`"filtered"` would reach them."""
    from bbld import dbus

    found = []
    for bus in (dbus.SESSION, dbus.SYSTEM):
        try:
            found.append((OK, f"{bus} bus", f"{dbus.host_address(bus, dict(os.environ))} "
                          "answers"))
        except dbus.DBusError as exc:
            found.append((WARN, f"{bus} bus", f"{exc} (profiles with dbus need it)"))
    return found


def _network():
    """libnftables, which the egress rules of `net = "nat"` need (the tun device and pasta
    have their own lines)."""
    import ctypes

    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return [(WARN, "libnftables", "not installed (net = \"nat\" needs it): apt install "
                 "libnftables1")]
    return [(OK, "libnftables", "loads (the egress rules of net = \"nat\")")]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


PROBES = (_user_namespaces, _daemon, _units, _kernel_facilities, _cgroup, _session)
