"""What a spec's `network` asks for in a layer's network namespace (its loopback is
bbld/engine/network.py's). Imported by the engine's caller only for an instance that has one:
its imports would otherwise weigh on every forked monitor.

`network` is begun by the engine's caller as soon as the layer is built (while the rest of
the tree is built) and completed before the go byte, so nothing of the sandbox runs before
it holds (`Setup`):

1. NAT: pasta (or slirp4netns), in our (the host's) network namespace, joins the layer's
   user and network namespaces through the fds its Built report carried, makes the tap
   interface `eth0` and configures it. It runs in the foreground as our child, with our
   death as its parent-death signal, followed by pidfd and ended with the instance; it says
   it is ready on a pipe of ours (pasta writes its pid file there, slirp4netns its ready
   byte). slirp4netns takes its forwards on an API socket once it runs.
2. A forked child of ours enters the namespace (the user namespace that owns it first,
   which gives it CAP_NET_ADMIN there) and installs the egress rules (nftables, through
   libnftables) while the NAT comes up, then, once `eth0` is there, the shaping (tc qdiscs
   through pyroute2, imported only in that child).

The app runs in a user namespace below the one that owns the network namespace, without
capabilities over it: it cannot change what was set (tests/test_network.py tries).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import select
import signal
import socket
import time

from msgspec import Struct

from bbld import net as network_words  # (the profile's words for what the host lacks)
from bbld import spec
from bbld.engine import syscalls as sc
from bbld.engine.enter import join_namespaces
from bbld.engine.errors import EXIT_USAGE, StartError

INTERFACE = "eth0"  # the NAT's interface inside
DOWNLOAD = "ifb0"  # where downloads are shaped: eth0's ingress is redirected to it
TIMEOUT = 10.0  # seconds for the NAT to connect the namespace, and for the rules and shaping
# deny_local: private (RFC 1918, ULA), shared (CGNAT) and link-local ranges
LOCAL_RANGES = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                "169.254.0.0/16", "fc00::/7", "fe80::/10")
SLIRP_GATEWAY = "10.0.2.2"  # slirp4netns's host side (its loopback, unless disabled)
PACKAGES = {"pasta": "passt", "slirp4netns": "slirp4netns"}


# ---------------------------------------------------------------- what the caller checks


# ---------------------------------------------------------------- the pure parts


def nat_argv(program: str, net: spec.Network, netns: str, userns: str | None, ready: int,
             api: str | None = None) -> list[str]:
    """The NAT program's command line (`ready`: the fd it tells it is ready on, `api`:
    slirp4netns's API socket for the forwards)."""
    if net.nat_with == "pasta":
        return pasta_argv(program, net, netns, userns, f"/proc/self/fd/{ready}")
    argv = [program, "--configure", "--mtu", str(net.mtu), "--disable-host-loopback",
            "--enable-seccomp", "--ready-fd", str(ready), "--netns-type=path"]
    # (no --enable-sandbox: it needs root in the user namespace it runs in)
    argv += [f"--userns-path={userns}"] if userns else []
    argv += ["--api-socket", api] if api else []
    return [*argv, netns, INTERFACE]


def pasta_argv(program: str, net: spec.Network, netns: str, userns: str | None,
               pid_file: str) -> list[str]:
    """pasta's command line: nothing forwarded either way but what `net` names (pasta's
    defaults would forward every port bound on either side), the gateway not mapped to the
    host (that would open every host service), our own ids (as root it would switch to
    nobody, which clears the parent-death signal)."""
    argv = [program, "--foreground", "--quiet", "--config-net", "--no-map-gw",
            "--ns-ifname", INTERFACE, "--mtu", str(net.mtu), "--pid", pid_file,
            "--runas", f"{os.getuid()}:{os.getgid()}", "--netns", netns]
    argv += ["--userns", userns] if userns else ["--netns-only"]
    for option, protocol in (("--tcp-ports", "tcp"), ("--udp-ports", "udp")):
        specs = [f"{f.host_address}/{f.host_port}:{f.port}" for f in net.forward
                 if f.protocol == protocol]
        for value in specs or ["none"]:
            argv += [option, value]
    for option, protocol in (("--tcp-ns", "tcp"), ("--udp-ns", "udp")):
        ports = [str(h.port) for h in net.host_ports if h.protocol == protocol]
        argv += [option, ",".join(ports) or "none"]
    return argv


def ruleset(net: spec.Network, host_addresses: list[str]) -> str | None:
    """The egress rules as an nftables script, or None when there is nothing to filter.
    In order: the layer's own loopback and replies to connections made to it (forwards),
    `deny`, `allow`, the resolvers' port 53, the host's addresses, the local ranges; then, when
    `allow` lists anything, everything else is rejected. `reject` answers at once (ICMP
    unreachable, a TCP reset), so a denied connection fails fast instead of timing out."""
    lines = [f"{_match(rule)} reject".lstrip() for rule in net.deny]
    lines += [f"{_match(rule)} accept".lstrip() for rule in net.allow]
    for resolver in net.resolvers:
        family = _family(ipaddress.ip_address(resolver))
        lines += [f"{family} daddr {resolver} {proto} dport 53 accept" for proto in ("udp", "tcp")]
    fenced = []
    if net.deny_host:
        fenced += [ipaddress.ip_network(a) for a in host_addresses
                   if not ipaddress.ip_address(a).is_loopback]
    if net.deny_local:
        fenced += [ipaddress.ip_network(r) for r in LOCAL_RANGES]
    for version in (4, 6):
        # (an nftables set refuses overlapping intervals: merge them)
        chosen = [str(n) for n in ipaddress.collapse_addresses(
            n for n in fenced if n.version == version)]
        if chosen:
            lines.append(f"{'ip' if version == 4 else 'ip6'} daddr {{ {', '.join(chosen)} }} "
                         "reject")
    if net.allow:
        lines.append("reject")
    if not lines:
        return None
    body = "\n".join(f"    {line}" for line in [
        "type filter hook output priority filter; policy accept;",
        'oifname "lo" accept', "ct state established,related accept", *lines])
    return f"table inet bbl {{\n  chain output {{\n{body}\n  }}\n}}\n"


def _family(address) -> str:
    return "ip" if address.version == 4 else "ip6"


def _match(rule: spec.EgressRule) -> str:
    parts = []
    if rule.to != "any":
        network = ipaddress.ip_network(rule.to, strict=False)
        parts.append(f"{_family(network)} daddr {network}")
    if rule.protocol and rule.ports:
        first, last = rule.ports
        parts.append(f"{rule.protocol} dport {first if first == last else f'{first}-{last}'}")
    elif rule.protocol:
        parts.append(f"meta l4proto {rule.protocol}")
    return " ".join(parts)


def window(rate: int) -> int:
    """The most a TCP peer may have in flight towards the layer, and what each queue holds:
    a quarter of a second at the rate, at least 64 KiB. Downloads are shaped after the NAT
    has sent them, and a NAT whose packets the queue drops retransmits slowly (pasta: 1 MiB
    at 4 Mbit/s took 33 s with a 50 ms queue, 5 s with 1 s of queue); with the layer's
    receive window no larger than the queue, nothing is dropped and the rate holds (2.1 s)."""
    return max(rate // 8 // 4, 65536)


def burst(rate: int, mtu: int) -> int:
    """TBF's bucket in bytes: 20 ms at the rate, and never less than a few packets (a bucket
    smaller than one packet never lets it through: the trap of a 64 KiB MTU)."""
    return max(rate // 8 // 50, 4 * (mtu + 14), 16384)


# ---------------------------------------------------------------- the caller's part


class Child(Struct):
    """A child of ours followed by pidfd: the NAT, or the process that configures the
    namespace."""
    pid: int
    pidfd: int

    def kill(self) -> None:
        try:
            sc.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def end(self) -> None:
        """Kill and reap it. A NAT's exit takes 30 to 50 ms here (its tap device and buffers
        go): Instance reaps it after its caller has told the instance's end."""
        self.kill()
        try:
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        except ChildProcessError:
            pass  # reaped already (it ended on its own)
        os.close(self.pidfd)


class Setup:
    """What a layer's `network` needs, begun as soon as the layer is built (the NAT comes up,
    and a child of ours enters the namespace and loads the rules, while the rest of the tree
    is built) and completed before the go. Raises StartError with nothing left running."""

    def __init__(self, net: spec.Network, net_fd: int, environ: dict[str, str]):
        self.net = net
        self.nat: Child | None = None
        self.child: Child | None = None  # the process that configures the namespace
        self.ready: int | None = None  # read end: the NAT says it is ready
        self.log: int | None = None  # the NAT's messages (a memfd: never a full pipe)
        self.api_dir: str | None = None  # slirp4netns's API socket's directory
        self.go: int | None = None  # write end: the child may shape (eth0 is there)
        self.errors: int | None = None  # read end: the child's failure, in words
        try:
            owner = _owner(net_fd)
            try:
                if net.nat:
                    self._start_nat(net_fd, owner, environ)
                host = sc.host_addresses() if net.deny_host else []
                if net.deny_host and net.nat_with == "slirp4netns":
                    host.append(SLIRP_GATEWAY)
                rules = ruleset(net, host)
                if rules or net.rate or net.delay_ms:
                    self._start_child(net_fd, owner, rules)
            finally:
                if owner is not None:
                    os.close(owner)
        except BaseException:
            self.abandon()
            raise

    def complete(self) -> Child | None:
        """Wait until the NAT is ready and the namespace configured; the NAT process, if
        any, is the caller's to end."""
        try:
            if self.nat is not None:
                if not _wait_readable(self.ready, self.nat.pidfd) or \
                        not os.read(self.ready, 32).strip():
                    said = _last_line(self.log) or f"no answer within {TIMEOUT:g}s"
                    raise StartError(f"network: {self.net.nat_with} could not connect the "
                                     f"namespace: {said}")
                if self.api_dir:
                    _add_forwards(os.path.join(self.api_dir, "api.sock"), self.net.forward)
            if self.child is not None:
                if self.go is not None:
                    try:
                        os.write(self.go, b"1")
                    except BrokenPipeError:
                        pass  # it failed already: it says why
                self._wait_for_child()
        except BaseException:
            self.abandon()
            raise
        nat, self.nat = self.nat, None
        self._close()
        return nat

    def children(self) -> list[Child]:
        return [c for c in (self.nat, self.child) if c is not None]

    def abandon(self) -> None:
        """End what was begun (a failed start)."""
        for process in (self.child, self.nat):
            if process is not None:
                process.end()
        self.child = self.nat = None
        self._close()

    def _close(self) -> None:
        for name in ("ready", "log", "go", "errors"):
            if getattr(self, name) is not None:
                os.close(getattr(self, name))
                setattr(self, name, None)
        if self.api_dir:  # (slirp4netns listens on until it ends; we have no more to say)
            for remove, path in ((os.unlink, os.path.join(self.api_dir, "api.sock")),
                                 (os.rmdir, self.api_dir)):
                try:
                    remove(path)
                except OSError:
                    pass
            self.api_dir = None

    def _start_nat(self, net_fd: int, owner: int | None, environ: dict[str, str]) -> None:
        net = self.net
        program = network_words.program(net.nat_with, environ)
        if program is None:
            package = PACKAGES[net.nat_with]
            raise StartError(f"network: NAT needs {net.nat_with}, which is not installed: apt "
                             f"install {package} (dnf/pacman install {package})", EXIT_USAGE)
        problem = network_words.tun_problem()
        if problem:
            raise StartError(f"network: {problem}", EXIT_USAGE)
        self.ready, ready_w = os.pipe2(os.O_CLOEXEC)
        self.log = os.memfd_create("nat-log", os.MFD_CLOEXEC)
        if net.forward and net.nat_with == "slirp4netns":
            import tempfile  # (slirp4netns's forwards only)

            self.api_dir = tempfile.mkdtemp(prefix="bbl-nat-")
        api = os.path.join(self.api_dir, "api.sock") if self.api_dir else None
        argv = nat_argv(program, net, f"/proc/self/fd/{net_fd}",
                        f"/proc/self/fd/{owner}" if owner is not None else None, ready_w, api)
        try:
            pid = os.fork()
            if pid == 0:
                _exec_nat(argv, [fd for fd in (net_fd, owner, ready_w) if fd is not None],
                          self.log)
            self.nat = Child(pid=pid, pidfd=sc.pidfd_open(pid))
        finally:
            os.close(ready_w)

    def _start_child(self, net_fd: int, owner: int | None, rules: str | None) -> None:
        """Fork the child that enters the namespace (its owner first, which gives it
        CAP_NET_ADMIN there), loads the rules, and shapes once the NAT's eth0 is there."""
        shaping = bool(self.net.rate or self.net.delay_ms)
        self.errors, errors_w = os.pipe2(os.O_CLOEXEC)
        go_r = None
        if shaping:
            go_r, self.go = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
            if pid == 0:
                _configure(self.net, net_fd, owner, rules, errors_w, go_r)
            self.child = Child(pid=pid, pidfd=sc.pidfd_open(pid))
        finally:
            os.close(errors_w)
            if go_r is not None:
                os.close(go_r)

    def _wait_for_child(self) -> None:
        child, self.child = self.child, None
        try:
            if not _wait_readable(self.errors, child.pidfd) and not _ended(child.pidfd):
                child.kill()
            message = os.read(self.errors, 4096).decode(errors="replace")
            status = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
        finally:
            os.close(child.pidfd)
        if message or status.si_status != 0 or status.si_code != os.CLD_EXITED:
            raise StartError(f"network: {message or 'setting up took longer than %gs' % TIMEOUT}",
                             status.si_status if status.si_code == os.CLD_EXITED else 1)


def _owner(net_fd: int) -> int | None:
    """An fd of the user namespace that owns `net_fd`, or None if that is our own."""
    owner = fcntl.ioctl(net_fd, sc.NS_GET_USERNS)
    ours = os.stat("/proc/self/ns/user")
    info = os.fstat(owner)
    if (info.st_dev, info.st_ino) == (ours.st_dev, ours.st_ino):
        os.close(owner)
        return None
    return owner


def _add_forwards(api: str, forwards: list[spec.PortForward]) -> None:
    """slirp4netns's forwards, one API request each (JSON, one reply per connection)."""
    import json  # (slirp4netns's forwards only)

    for forward in forwards:
        request = {"execute": "add_hostfwd", "arguments": {
            "proto": forward.protocol, "host_addr": forward.host_address,
            "host_port": forward.host_port, "guest_port": forward.port}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(TIMEOUT)
            try:
                sock.connect(api)
                sock.sendall(json.dumps(request).encode())
                sock.shutdown(socket.SHUT_WR)
                reply = json.loads(sock.recv(65536) or b"{}")
            except (OSError, ValueError) as exc:
                raise StartError(f"network: slirp4netns's API: {exc}") from None
        if "return" not in reply:
            error = reply.get("error", {}).get("desc", reply)
            raise StartError(f"network: forward {forward.host_address}:{forward.host_port} -> "
                             f"{forward.port}: {error}", EXIT_USAGE)


def _exec_nat(argv: list[str], keep: list[int], log: int) -> None:
    """In the forked child: dies with us, no signal blocked, stdin empty, output to the log."""
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        sc.set_signal_mask(signal.SIG_SETMASK, [])
        sc.default_signal_actions(signal.SIGPIPE, signal.SIGXFSZ)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sc.close_all_fds_except({0, 1, 2, *keep})
        for fd in keep:
            os.set_inheritable(fd, True)
        os.execv(argv[0], argv)
    finally:
        os._exit(127)


def _wait_readable(fd: int, pidfd: int) -> bool:
    """Wait for `fd` to be readable; False if the process of `pidfd` ended first or the time
    ran out."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        ready = {f for f, _ in poller.poll(left * 1000)}
        if fd in ready:
            return True
        if pidfd in ready:
            return False
    return False


def _last_line(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    lines = [line for line in text.splitlines() if line and "to syslog" not in line]
    return lines[-1] if lines else ""


def _configure(net: spec.Network, net_fd: int, owner: int | None, rules: str | None,
               errors: int, go: int | None) -> None:
    """In the forked child: the rules, then (once the caller says eth0 is there) the
    shaping; a failure is written to `errors`. Never returns."""
    code = 0
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        sc.close_all_fds_except({0, 1, 2, net_fd, errors, *(fd for fd in (owner, go)
                                                             if fd is not None)})
        join_namespaces({"net": net_fd, **({"user": owner} if owner is not None else {})})
        if rules:
            _load_rules(rules)
        if go is not None:
            from pyroute2 import IPRoute  # noqa: F401 (imported while the NAT comes up)

            if os.read(go, 1) == b"1":  # (EOF: the start was called off)
                _shape(net)
    except StartError as exc:
        os.write(errors, str(exc).encode()[:4096])
        code = exc.exit_code
    except BaseException as exc:  # noqa: BLE001 (a bug: said, not lost)
        os.write(errors, f"{type(exc).__name__}: {exc}".encode()[:4096])
        code = 1
    os._exit(code)


def _ended(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def _load_rules(rules: str) -> None:
    """Load an nftables script with libnftables (what `nft -f` does, without a program that
    would lose our capabilities across execve when our uid is not 0 here)."""
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError:
        raise StartError("egress rules need libnftables: apt install libnftables1 "
                         "(or nftables)", EXIT_USAGE) from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    context = lib.nft_ctx_new(0)
    lib.nft_ctx_buffer_error(context)
    if lib.nft_run_cmd_from_buffer(context, rules.encode()) != 0:
        error = (lib.nft_ctx_get_error_buffer(context) or b"").decode(errors="replace")
        first = next((line for line in error.splitlines() if line.strip()), "failed")
        raise StartError(f"egress rules: {first}")


def _cap_tcp_queues(net: spec.Network) -> None:
    """TCP in the namespace (its own sysctls: we are in it) kept within the shaping queues.
    The receive buffer at most the download queue, so the NAT never sends more than it holds.
    At most a bucket of each socket's data waits below it for the upload queue (TCP small
    queues): a socket that filled a quarter of a second of queue saw its round trip grow past
    its retransmission timer and resent what was still queued (a 1 MiB upload at 4 Mbit/s took
    5 to 17 s instead of 2.1)."""
    window_size = window(net.rate)
    _write_sysctl("ipv4/tcp_rmem", lambda low, default, _: f"{min(int(low), window_size)} "
                  f"{min(int(default), window_size)} {window_size}")
    _write_sysctl("ipv4/tcp_limit_output_bytes", lambda _: str(burst(net.rate, net.mtu)))


def _write_sysctl(name: str, value) -> None:
    """/proc/sys/net/NAME set to value(*its current fields)."""
    path = f"/proc/sys/net/{name}"
    try:
        with open(path) as f:
            fields = f.read().split()
        with open(path, "w") as f:
            f.write(value(*fields))
    except OSError as exc:
        raise StartError(f"rate: cannot set {path} ({exc.strerror})") from None


def _shape(net: spec.Network) -> None:
    """Uploads through a TBF on eth0; downloads (eth0's ingress) redirected to an IFB device
    with a TBF of its own; `delay_ms` as a netem qdisc above each TBF."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=INTERFACE)
        if not found:
            raise StartError(f"rate: no {INTERFACE} to shape (rate needs nat)", EXIT_USAGE)
        eth = found[0]
        try:
            ipr.link("add", ifname=DOWNLOAD, kind="ifb")
        except NetlinkError as exc:
            raise StartError(f"rate: cannot make an ifb device to shape downloads "
                             f"({exc.args[1]}): as root, modprobe ifb", EXIT_USAGE) from None
        ifb = ipr.link_lookup(ifname=DOWNLOAD)[0]
        ipr.link("set", index=ifb, state="up")
        for device in (eth, ifb):
            parent = "root"
            if net.delay_ms:
                try:
                    ipr.tc("add", "netem", device, handle="1:", delay=net.delay_ms * 1000)
                except NetlinkError as exc:  # (ENOENT: "Specified qdisc kind is unknown")
                    raise StartError("delay: this kernel has no netem qdisc (sch_netem)" if
                                     exc.code == errno.ENOENT else f"delay: {exc.args[1]}",
                                     EXIT_USAGE) from None
                parent = "1:1"
            if net.rate:
                options = {"rate": f"{net.rate}bit", "burst": burst(net.rate, net.mtu),
                           "limit": window(net.rate) + burst(net.rate, net.mtu)}
                if parent == "root":
                    ipr.tc("add", "tbf", device, handle="10:", **options)
                else:
                    ipr.tc("add", "tbf", device, handle="10:", parent=parent, **options)
        if net.rate:
            _cap_tcp_queues(net)
        ipr.tc("add", "ingress", eth, "ffff:")
        ipr.tc("add-filter", "u32", eth, parent="ffff:", protocol=0x0003, prio=1,
               keys=["0x0/0x0+0"], target=0x10001,
               action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                        "ifindex": ifb}])
