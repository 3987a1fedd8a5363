"""The profile's `net`: a mode name, or a `[net]` table with `mode` and the options (TOML cannot
give one key both a string and a table). Its words are checked here, with the profile's keys,
and turned into the spec's `Network` for layer3 (docs/profiles.md, "Network"). Pure data but
for `host_problem` (is pasta there, is /dev/net/tun usable). No trio, no engine.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Literal

from msgspec import Struct

from bbld import spec

NAT_PROGRAMS = ("pasta", "slirp4netns")  # the first found does it (docs/dependencies.md)
SLIRP_DNS = "10.0.2.3"  # slirp4netns's DNS forwarder (to the host's resolver)
TUN = "/dev/net/tun"
RESOLV_CONF = "/etc/resolv.conf"
# Where systemd-resolved lists the servers its stub (127.0.0.53) asks
STUB_UPSTREAMS = "/run/systemd/resolve/resolv.conf"

Mode = Literal["none", "host", "nat"]


class Net(Struct, forbid_unknown_fields=True, kw_only=True):
    mode: Mode = "nat"
    forward: list[str] = []  # "[tcp:|udp:][ADDRESS:]HOST_PORT[:PORT]", bound on the host
    host_ports: list[str | int] = []  # "[tcp:|udp:]PORT" of the host's loopback, reached inside
    rate: str | None = None  # "4mbit": download and upload each
    delay: str | None = None  # "40ms", each way (needs netem in the kernel)
    deny: list[str] = []  # "[tcp:|udp:]ADDRESS[/PREFIX][:PORT[-PORT]]", "*" any address
    allow: list[str] = []  # when given, everything not allowed is rejected
    deny_host: bool = True  # the host's own addresses
    deny_local: bool = False  # private, shared and link-local ranges: the LAN


def of(value: str | Net) -> Net:
    return Net(mode=value) if isinstance(value, str) else value


# ---------------------------------------------------------------- the words

_PROTO = r"(?:(?P<proto>tcp|udp):)?"
_FORWARD = re.compile(_PROTO + r"(?:(?P<address>\[[0-9a-fA-F:.]+\]|\d+\.\d+\.\d+\.\d+):)?"
                      r"(?P<host_port>\d+)(?::(?P<port>\d+))?")
_HOST_PORT = re.compile(_PROTO + r"(?P<port>\d+)")
_RULE = re.compile(_PROTO + r"(?:\[(?P<v6>[0-9a-fA-F:.]+(?:/\d+)?)\]|(?P<address>[^:\[\]]+)|"
                            r"(?P<bare6>[0-9a-fA-F:.]+(?:/\d+)?))"
                            r"(?::(?P<first>\d+)(?:-(?P<last>\d+))?)?")
_RATE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmg]?)(?P<kind>bit|bps)",
                   re.IGNORECASE)
_DELAY = re.compile(r"(?P<ms>\d+)\s*ms")


class Wrong(ValueError):
    """A value of `net` that does not parse: the message says how it should look."""


def forward(text: str) -> spec.PortForward:
    match = _FORWARD.fullmatch(text)
    if not match:
        raise Wrong(f"{text!r} must be [tcp:|udp:][ADDRESS:]HOST_PORT[:PORT], e.g. "
                    "\"127.0.0.1:8080:80\" or \"udp:5353:53\"")
    address = (match["address"] or "127.0.0.1").strip("[]")
    host_port = _port(match["host_port"], text)
    return spec.PortForward(protocol=match["proto"] or "tcp", host_address=_address(address),
                            host_port=host_port,
                            port=_port(match["port"], text) if match["port"] else host_port)


def host_port(value: str | int) -> spec.HostPort:
    match = _HOST_PORT.fullmatch(str(value))
    if not match:
        raise Wrong(f"{value!r} must be [tcp:|udp:]PORT, e.g. 5432 or \"udp:53\"")
    return spec.HostPort(protocol=match["proto"] or "tcp", port=_port(match["port"], value))


def rule(text: str) -> spec.EgressRule:
    match = _RULE.fullmatch(text)
    if not match:
        raise Wrong(f"{text!r} must be [tcp:|udp:]ADDRESS[/PREFIX][:PORT[-PORT]] (an IPv6 "
                    "address with a port in brackets), e.g. \"10.0.0.0/8\" or \"tcp:*:25\"")
    target = match["v6"] or match["address"] or match["bare6"]
    if target != "*":
        try:
            target = str(ipaddress.ip_network(target, strict=False))
        except ValueError:
            raise Wrong(f"{text!r}: {target!r} is not an address or prefix (\"*\": any)") \
                from None
    ports = None
    if match["first"]:
        if not match["proto"]:
            raise Wrong(f"{text!r}: a port needs a protocol, e.g. \"tcp:{text}\"")
        first = _port(match["first"], text)
        last = _port(match["last"], text) if match["last"] else first
        if last < first:
            raise Wrong(f"{text!r}: the port range ends before it starts")
        ports = (first, last)
    return spec.EgressRule(to="any" if target == "*" else target, protocol=match["proto"],
                           ports=ports)


def rate(text: str) -> int:
    """"4mbit" -> 4000000 bits per second (tc's units: k = 1000; bps = bytes per second)."""
    match = _RATE.fullmatch(text.strip())
    if not match:
        raise Wrong(f"{text!r} must be a rate like \"4mbit\", \"512kbit\" or \"1mbps\" "
                    "(bytes per second)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match["unit"].lower()]
    bits = float(match["number"]) * scale * (8 if match["kind"].lower() == "bps" else 1)
    if bits < 8000:
        raise Wrong(f"{text!r} is below 8kbit, too slow to carry a packet in time")
    return int(bits)


def delay(text: str) -> int:
    match = _DELAY.fullmatch(text.strip())
    if not match or int(match["ms"]) < 1:
        raise Wrong(f"{text!r} must be a delay like \"40ms\"")
    return int(match["ms"])


def _port(text, whole) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise Wrong(f"{whole!r}: {port} is not a port (1 to 65535)")
    return port


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Wrong(f"{text!r} is not an IP address") from None


# ---------------------------------------------------------------- the profile's checks


def problems(value: Net) -> list[tuple[str, str]]:
    """(where, what is wrong) for every problem of the words, without looking at the host."""
    found = []
    default = Net()
    options = [name for name in value.__struct_fields__
               if name != "mode" and getattr(value, name) != getattr(default, name)]
    if value.mode != "nat":
        for name in options:
            found.append((f"$.net.{name}", f"needs mode = \"nat\" (mode {value.mode!r} has "
                          "no NAT to set up)"))
        return found
    for key, parse in (("forward", forward), ("host_ports", host_port), ("deny", rule),
                       ("allow", rule)):
        for index, item in enumerate(getattr(value, key)):
            try:
                parse(item)
            except Wrong as exc:
                found.append((f"$.net.{key}[{index}]", str(exc)))
    for key, parse in (("rate", rate), ("delay", delay)):
        if getattr(value, key) is not None:
            try:
                parse(getattr(value, key))
            except Wrong as exc:
                found.append((f"$.net.{key}", str(exc)))
    return found


def nat_with(environ: dict[str, str]) -> str | None:
    """The NAT program `environ`'s PATH has: pasta, else slirp4netns; None if neither."""
    return next((name for name in NAT_PROGRAMS if program(name, environ)), None)


def program(name: str, environ: dict[str, str]) -> str | None:
    """`name` in `environ`'s PATH (shutil.which's job, whose imports would cost a NAT start in
    the monitor 3 ms)."""
    for directory in (environ.get("PATH") or os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def tun_problem() -> str | None:
    """Why the NAT cannot open /dev/net/tun, as a one-line fix; None if it can (asked when
    the profile is read, and again by the engine, which may run a spec without one)."""
    if os.access(TUN, os.R_OK | os.W_OK):
        return None
    if not os.path.exists(TUN):
        return f"nat needs {TUN}, which does not exist: as root, modprobe tun"
    return (f"nat needs {TUN}, which uid {os.getuid()} cannot open (mode "
            f"{os.stat(TUN).st_mode & 0o777:04o}): as root, chmod 0666 {TUN} (desktop "
            "distributions ship it so), or use net = \"none\"")


def host_problem(value: Net, environ: dict[str, str]) -> str | None:
    """What this host lacks for `value`, as one line with the fix; None if nothing."""
    if value.mode != "nat":
        return None
    program = nat_with(environ)
    if program is None:
        return "nat needs pasta (or slirp4netns), and neither is installed: apt install " \
               "passt (dnf/pacman install passt)"
    if value.host_ports and program != "pasta":
        return "host_ports needs pasta (slirp4netns, the one installed, reaches every host " \
               "loopback port or none): apt install passt"
    return tun_problem()


def nameservers_to_write(value: Net, dns: list[str], environ: dict[str, str]) -> list[str]:
    """The name servers the template writes into the app's /etc/resolv.conf ([]: the host's
    file serves as it is): the profile's `dns`; behind slirp4netns its forwarder; behind pasta,
    where the host's servers are all on its loopback, the servers that stub asks."""
    if dns or value.mode != "nat":
        return list(dns)
    return [SLIRP_DNS] if nat_with(environ) == "slirp4netns" else stub_upstreams()


def network(value: Net, dns: list[str], environ: dict[str, str]) -> spec.Network | None:
    """The spec's Network for layer3 (None unless mode is "nat"). The name servers the app
    asks stay reachable on port 53 whatever deny_host and deny_local say."""
    if value.mode != "nat":
        return None
    asked = nameservers_to_write(value, dns, environ) or nameservers(RESOLV_CONF)
    return spec.Network(
        nat=True, nat_with=nat_with(environ) or "pasta",
        forward=[forward(f) for f in value.forward],
        host_ports=[host_port(p) for p in value.host_ports],
        resolvers=[a for a in asked if not ipaddress.ip_address(a).is_loopback],
        rate=rate(value.rate) if value.rate else None,
        delay_ms=delay(value.delay) if value.delay else None,
        deny=[rule(r) for r in value.deny], allow=[rule(r) for r in value.allow],
        deny_host=value.deny_host, deny_local=value.deny_local)


def stub_upstreams() -> list[str]:
    """When the host's name servers are all on its loopback (a local stub such as
    systemd-resolved's 127.0.0.53), which a NAT'd app cannot reach (its loopback is its own):
    the servers that stub asks, for the app's own /etc/resolv.conf, as podman and docker do.
    Else [] (the host's /etc/resolv.conf serves the app as it is)."""
    host = nameservers(RESOLV_CONF)
    if not host or not all(ipaddress.ip_address(a).is_loopback for a in host):
        return []
    return [a for a in nameservers(STUB_UPSTREAMS) if not ipaddress.ip_address(a).is_loopback]


def nameservers(path: str) -> list[str]:
    """The `nameserver` addresses of a resolv.conf file ([] if there is none)."""
    try:
        with open(path) as f:
            words = [line.split() for line in f]
    except OSError:
        return []
    found = []
    for line in words:
        if len(line) > 1 and line[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(line[1].split("%")[0])))
            except ValueError:
                continue
    return found
