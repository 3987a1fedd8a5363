"""Network: `net = "none" | "host" | "nat"` and the [net] table (forwards, host ports, shaping,
egress rules): the words, what the engine hands pasta and nftables, and, in a private world
of network namespaces (tests/net/world.py: a "host" with loopback servers, a "remote host"
behind it), what an app can and cannot reach, and that it cannot undo any of it."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from bbld import net, profile, spec
from bbld.engine import netsetup
from tests.conftest import (
    BBLCTL,
    BBLD,
    TIMEOUT,
    app_layer,
    layer,
    read_line,
    sandbox,
    system_ops,
    wait_for_socket,
    wait_gone,
    wait_until,
)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "net")
SYSTEM_PYTHON = "/usr/bin/python3"
REMOTE, PRIVATE, HOST_SELF = "198.18.0.1", "10.99.0.1", "10.98.0.1"
REMOTE6, PRIVATE6, HOST_SELF6 = "[2001:db8::1]", "[fd99::1]", "[2001:db8:1::1]"


def write(tmp_path, text: str, name: str = "p.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _libnftables() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libnftables.so.1")
    except OSError:
        return False
    return True


real_nat = pytest.mark.skipif(
    not (os.access("/dev/net/tun", os.R_OK | os.W_OK) and _libnftables()
         and os.path.exists(SYSTEM_PYTHON) and shutil.which("nsenter")),
    reason="needs a usable /dev/net/tun, libnftables and nsenter (.ci/run installs them; "
           "tests/run.sh makes the tun device 0666 as desktop distributions ship it)")
ENV = {"PATH": os.defpath}


# ---------------------------------------------------------------- the words


@pytest.mark.parametrize("text, parsed", [
    ("127.0.0.1:8080:80", spec.PortForward(host_address="127.0.0.1", host_port=8080, port=80)),
    ("udp:5353:53", spec.PortForward(protocol="udp", host_port=5353, port=53)),
    ("8080", spec.PortForward(host_port=8080, port=8080)),
    ("[::1]:8443:443", spec.PortForward(host_address="::1", host_port=8443, port=443)),
])
def test_forwards_are_bound_on_the_hosts_loopback_unless_an_address_is_given(text, parsed):
    assert net.forward(text) == parsed


@pytest.mark.parametrize("text, parsed", [
    ("10.0.0.0/8", spec.EgressRule(to="10.0.0.0/8")),
    ("10.1.2.3/8", spec.EgressRule(to="10.0.0.0/8")),
    ("tcp:*:25", spec.EgressRule(to="any", protocol="tcp", ports=(25, 25))),
    ("udp:198.18.0.1:5000-5010", spec.EgressRule(to="198.18.0.1/32", protocol="udp",
                                                 ports=(5000, 5010))),
    ("fc00::/7", spec.EgressRule(to="fc00::/7")),
    ("tcp:[2001:db8::1]:443", spec.EgressRule(to="2001:db8::1/128", protocol="tcp",
                                              ports=(443, 443))),
])
def test_egress_rules_parse(text, parsed):
    assert net.rule(text) == parsed


@pytest.mark.parametrize("text, bits", [("4mbit", 4_000_000), ("512kbit", 512_000),
                                        ("1mbps", 8_000_000), ("2.5Mbit", 2_500_000)])
def test_rates_take_tcs_units(text, bits):
    assert net.rate(text) == bits


BROKEN = [
    ('[net]\nforward = ["x"]\n', 2, "net.forward[0]: 'x' must be [tcp:|udp:][ADDRESS:]"),
    ('[net]\nforward = ["127.0.0.1:0:80"]\n', 2, "net.forward[0]: '127.0.0.1:0:80': 0 is not"),
    ('[net]\nhost_ports = ["tcp:99999"]\n', 2, "net.host_ports[0]: 'tcp:99999': 99999 is not"),
    ('[net]\ndeny = ["*:25"]\n', 2, "net.deny[0]: '*:25': a port needs a protocol"),
    ('[net]\nallow = ["10.0.0.300"]\n', 2, "net.allow[0]: '10.0.0.300': '10.0.0.300' is not"),
    ('[net]\nrate = "fast"\n', 2, "net.rate: 'fast' must be a rate like \"4mbit\""),
    ('[net]\ndelay = "1s"\n', 2, "net.delay: '1s' must be a delay like \"40ms\""),
    ('[net]\nmode = "none"\nrate = "1mbit"\n', 3, "net.rate: needs mode = \"nat\""),
    ('[net]\nmode = "host"\ndeny_local = true\n', 3, "net.deny_local: needs mode = \"nat\""),
    ('net = "slirp"\n', 1, "net: Invalid enum value 'slirp'"),
    ('[net]\nports = [1]\n', 2, "net.ports: unknown key"),
]


@pytest.mark.parametrize("text, line, problem", BROKEN)
def test_bad_words_are_refused_with_file_and_line(tmp_path, text, line, problem):
    path = write(tmp_path, text)
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(path, {"HOME": "/home/u", "PATH": os.defpath})
    assert caught.value.problems[0].startswith(f"{path}:{line}: {problem}"), \
        caught.value.problems


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, '[net]\nforward = ["x"]\nrate = "fast"\ndeny = ["*:1"]\n')
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(path, {"HOME": "/home/u", "PATH": os.defpath})
    assert len(caught.value.problems) == 3


# ---------------------------------------------------------------- what the engine hands out


def test_pasta_forwards_nothing_it_is_not_told_to():
    """pasta's defaults forward every port bound on either side, and map the gateway to the
    host's loopback: every host service. None of that unless the profile says so."""
    bare = netsetup.pasta_argv("pasta", spec.Network(nat=True), "/ns/net", "/ns/user", "/pid")
    pairs = set(zip(bare, bare[1:], strict=False))
    assert {("--tcp-ports", "none"), ("--udp-ports", "none"), ("--tcp-ns", "none"),
            ("--udp-ns", "none"), ("--mtu", "1500"), ("--netns", "/ns/net"),
            ("--userns", "/ns/user")} <= pairs
    assert "--no-map-gw" in bare and "--foreground" in bare
    asked = net.network(net.Net(forward=["127.0.0.1:8080:80", "udp:5353:53"],
                                host_ports=[5432, "udp:53"]), [], ENV)
    argv = netsetup.pasta_argv("pasta", asked, "/ns/net", None, "/pid")
    pairs = set(zip(argv, argv[1:], strict=False))
    assert {("--tcp-ports", "127.0.0.1/8080:80"), ("--udp-ports", "127.0.0.1/5353:53"),
            ("--tcp-ns", "5432"), ("--udp-ns", "53")} <= pairs
    assert "--netns-only" in argv and "--userns" not in argv


def test_the_ruleset_denies_then_allows_then_fences_the_host_and_the_lan():
    rules = net.network(net.Net(deny=["tcp:198.18.0.1:7002"], allow=["tcp:*:443"],
                                deny_local=True), ["10.0.0.53"], ENV)
    text = netsetup.ruleset(rules, ["127.0.0.1", "192.0.2.2", "10.1.2.3", "::1", "fd00::2"])
    lines = [line.strip() for line in text.splitlines()]
    body = lines[lines.index('oifname "lo" accept'):]
    assert body == [
        'oifname "lo" accept', "ct state established,related accept",
        "ip daddr 198.18.0.1/32 tcp dport 7002 reject", "tcp dport 443 accept",
        "ip daddr 10.0.0.53 udp dport 53 accept", "ip daddr 10.0.0.53 tcp dport 53 accept",
        # (addresses inside the ranges merge into them: a set refuses overlaps)
        "ip daddr { 10.0.0.0/8, 100.64.0.0/10, 169.254.0.0/16, 172.16.0.0/12, 192.0.2.2/32, "
        "192.168.0.0/16 } reject", "ip6 daddr { fc00::/7, fe80::/10 } reject",
        "reject", "}", "}"]
    assert netsetup.ruleset(spec.Network(deny_host=False), []) is None


def test_slirp4netns_takes_no_host_loopback_and_its_forwards_on_its_api_socket():
    bare = netsetup.nat_argv("slirp4netns", spec.Network(nat=True, nat_with="slirp4netns"),
                            "/ns/net", "/ns/user", 7)
    assert bare == ["slirp4netns", "--configure", "--mtu", "1500", "--disable-host-loopback",
                    "--enable-seccomp", "--ready-fd", "7", "--netns-type=path",
                    "--userns-path=/ns/user", "/ns/net", "eth0"]
    forwarded = spec.Network(nat=True, nat_with="slirp4netns", forward=[net.forward("8080:80")])
    argv = netsetup.nat_argv("slirp4netns", forwarded, "/ns/net", None, 7, "/tmp/x/api.sock")
    assert "--api-socket" in argv and "--userns-path" not in " ".join(argv)


def test_only_pasta_reaches_host_ports(tmp_path):
    only_slirp = tmp_path / "bin"
    only_slirp.mkdir()
    (only_slirp / "slirp4netns").symlink_to("/bin/true")
    env = {"PATH": str(only_slirp)}
    assert net.nat_with(env) == "slirp4netns"
    assert net.host_problem(net.Net(host_ports=[5432]), env).startswith(
        "host_ports needs pasta")
    assert net.nameservers_to_write(net.Net(), [], env) == [net.SLIRP_DNS]
    assert net.nameservers_to_write(net.Net(), ["192.0.2.53"], env) == ["192.0.2.53"]
    assert net.host_problem(net.Net(), {"PATH": str(tmp_path)}).startswith(
        "nat needs pasta (or slirp4netns), and neither is installed")


def test_shaping_bursts_always_hold_a_few_packets():
    assert netsetup.burst(8000, 1500) >= 4 * 1500
    assert netsetup.burst(1_000_000_000, 1500) == 1_000_000_000 // 8 // 50


def test_the_template_gives_layer3_what_the_mode_says(tmp_path):
    env = {"HOME": "/home/u", "PATH": os.environ["PATH"]}

    def layer3(text):
        sandbox = profile.load(write(tmp_path, text), env)
        return spec.path_to(sandbox.layer, "layer3")[-1]

    host, none = layer3('net = "host"\n'), layer3('net = "none"\n')
    assert "net" not in host.namespaces and host.network is None
    assert "net" in none.namespaces and none.network is None
    if net.host_problem(net.Net(), env) is None:
        nat = layer3('[net]\nhost_ports = [5432]\nrate = "2mbit"\n')
        assert "net" in nat.namespaces and nat.network.nat and nat.network.rate == 2_000_000
        assert nat.network.resolvers == [a for a in net.nameservers(net.RESOLV_CONF)
                                         if a not in ("127.0.0.1", "::1")]


@pytest.mark.parametrize("host, upstream, app", [
    ("nameserver 127.0.0.53\n", "nameserver 10.0.0.1\nnameserver 127.0.0.1\n", ["10.0.0.1"]),
    ("nameserver 192.0.2.53\n", "nameserver 10.0.0.1\n", None),  # (the host's file serves)
])
def test_behind_nat_a_stub_resolver_on_the_hosts_loopback_gives_way_to_its_upstreams(
        tmp_path, monkeypatch, host, upstream, app):
    if not shutil.which("pasta") or net.host_problem(net.Net(), dict(os.environ)):
        pytest.skip("needs pasta and a usable /dev/net/tun")
    (tmp_path / "host").write_text(host)
    (tmp_path / "upstream").write_text(upstream)
    monkeypatch.setattr(net, "RESOLV_CONF", str(tmp_path / "host"))
    monkeypatch.setattr(net, "STUB_UPSTREAMS", str(tmp_path / "upstream"))
    sandbox = profile.load(write(tmp_path, 'net = "nat"\n'), dict(os.environ))
    layer3 = spec.path_to(sandbox.layer, "layer3")[-1]
    resolv = [op for op in layer3.fs if getattr(op, "dest", "") == "/etc/resolv.conf"]
    if app is None:
        assert resolv == [] and layer3.network.resolvers == ["192.0.2.53"]
    else:
        assert resolv[0].content == "".join(f"nameserver {a}\n" for a in app)
        assert layer3.network.resolvers == app


def test_without_pasta_a_start_is_one_line_naming_the_fix(tmp_path, bbl_env):
    path = write(tmp_path, 'command = ["true"]\nnet = "nat"\n')
    env = {**bbl_env, "PATH": str(tmp_path)}  # (nothing there)
    for argv in (("profile", "validate", path), ("start", path)):
        result = subprocess.run([*BBLCTL, *argv], env=env, capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"{path}:2: net: nat needs pasta" in result.stderr
        assert "apt install passt" in result.stderr


def test_the_validator_names_an_unusable_tun_device(tmp_path, monkeypatch):
    if not shutil.which("pasta"):
        pytest.skip("needs pasta (.ci/run installs passt)")
    fake = tmp_path / "tun"
    fake.write_text("")
    fake.chmod(0)  # (what a root-only 0600 device is to the user)
    monkeypatch.setattr(net, "TUN", str(fake))
    path = write(tmp_path, 'net = "nat"\n')
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(path, {"HOME": "/home/u", "PATH": os.environ["PATH"]})
    assert caught.value.problems == [
        f"{path}:1: net: nat needs {fake}, which uid {os.getuid()} cannot open (mode 0000): "
        f"as root, chmod 0666 {fake} (desktop distributions ship it so), or use net = \"none\""]


# ---------------------------------------------------------------- a world of its own


class World:
    """tests/net/world.py, and bblctl run inside it with a daemon of the test's own."""

    def __init__(self, tmp_path, env: dict, tun_0600: bool = False, nat_with: str = "pasta"):
        self.env = {**env, "PATH": os.environ["PATH"]}
        self.nat_with = nat_with
        self.nsenter = shutil.which("nsenter")
        if nat_with != "pasta":  # (the first found does it: a PATH with this one alone)
            only = tmp_path / "nat-bin"
            only.mkdir()
            (only / nat_with).symlink_to(shutil.which(nat_with))
            self.env["PATH"] = str(only)
        base = os.path.commonpath([tmp_path, env["HOME"]])  # (the test's own directories)
        self.source = source = os.path.dirname(os.path.dirname(HERE))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.net.world", *(["--tun-0600"] if tun_0600 else []),
             base, source, sys.prefix, os.path.realpath(sys.prefix)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(HERE)))
        line = read_line(self.proc.stdout)
        assert line.startswith("ready "), line
        self.pid = int(line.split()[1])
        self.tmp = tmp_path
        self.launchers: list[subprocess.Popen] = []
        # (a client does not start a daemon by itself in a user namespace of its own)
        self.daemon = subprocess.Popen(self.argv(BBLD), env=self.env, stdin=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
        wait_for_socket(os.path.join(self.env["XDG_RUNTIME_DIR"], "bbl", "bbld.sock"),
                        self.daemon)

    def argv(self, argv) -> list[str]:
        # (in the sources, entered by path: nsenter's --wd keeps a directory of the host's
        # mount, which is not reachable in the world's)
        return [self.nsenter, "-t", str(self.pid), "--user", "--net", "--mount",
                "--preserve-credentials", "--", "/bin/sh", "-c", 'cd "$0" && exec "$@"',
                self.source, *argv]

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", TIMEOUT)
        return subprocess.run(self.argv(argv), env=self.env, capture_output=True, text=True,
                              **kw)

    def ctl(self, *argv, **kw) -> subprocess.CompletedProcess:
        return self.run([*BBLCTL, *argv], stdin=subprocess.DEVNULL, **kw)

    def spec(self, options: str, command: list[str]) -> str:
        """A profile expanded here, as bbld would for `bblctl start` (inside the world, the
        host's root owns / as an unmapped uid, so BBL would trust no profile file there)."""
        path = write(self.tmp, f"command = {json.dumps(command)}\n"
                               f'mounts = [{{ src = "{HERE}", dest = "/probe" }}]\n{options}')
        spec_path = self.tmp / f"spec{len(os.listdir(self.tmp))}.json"
        spec_path.write_text(profile.spec_for_start(path, self.env))
        return str(spec_path)

    def start(self, options: str, command: list[str], **kw) -> subprocess.CompletedProcess:
        """Run the profile's app in the foreground; its output is the result's."""
        return self.run([sys.executable, "-m", "tests.launch", self.spec(options, command),
                         str(self.tmp / "id")], stdin=subprocess.DEVNULL, **kw)

    def detach(self, options: str, command: list[str]) -> str:
        """Start the app in the background (a launcher stays its client); its id."""
        ids = self.tmp / f"id{len(self.launchers)}"
        self.launchers.append(subprocess.Popen(
            self.argv([sys.executable, "-m", "tests.launch", self.spec(options, command),
                       str(ids)]), env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL))
        assert wait_until(lambda: ids.exists() or self.launchers[-1].poll() is not None)
        return ids.read_text()

    def probe(self, options: str, *probes: str, extra: str = "") -> dict:
        """What tests/net/probe.py finds from inside an app with `options`."""
        command = " ".join([SYSTEM_PYTHON, "/probe/probe.py", *probes]) + extra
        result = self.start(options, ["sh", "-c", command])
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        return {**json.loads(lines[0]), "after": lines[1:]}

    def nat_processes(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    comm, rest = f.read().rsplit(")", 1)
                name, state = comm.split("(", 1)[1], rest.split()[0]
                if name.startswith(("passt", "pasta", "slirp4netns")) and state != "Z" \
                        and os.stat(f"/proc/{entry}").st_uid == os.getuid():
                    found.append(int(entry))
            except (OSError, ValueError):
                continue
        return found

    def close(self) -> None:
        self.daemon.terminate()  # (nsenter execs: the process is bbld itself)
        self.daemon.wait(timeout=TIMEOUT)
        for launcher in self.launchers:
            launcher.kill()
            launcher.wait(timeout=TIMEOUT)
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


@pytest.fixture(params=["pasta", "slirp4netns"])
def world(request, tmp_path, bbl_env):
    if not shutil.which(request.param):
        pytest.skip(f"needs {request.param} (.ci/run installs it)")
    made = World(tmp_path, bbl_env, nat_with=request.param)
    try:
        yield made
    finally:
        made.close()


ALL = ["tcp:127.0.0.1:7010", "tcp:127.0.0.1:7011", f"tcp:{REMOTE}:7001", f"tcp:{REMOTE}:7002",
       f"tcp:{HOST_SELF}:7012", f"tcp:{PRIVATE}:7001", f"udp:{REMOTE}:7005", "interfaces"]
ALL6 = [f"tcp:{REMOTE6}:7001", f"tcp:{HOST_SELF6}:7012", f"tcp:{PRIVATE6}:7001"]


def refused(verdict: str) -> bool:
    return verdict.startswith("error ECONNREFUSED")


@real_nat
def test_nat_reaches_the_world_and_only_the_host_ports_it_names(world):
    ports = "host_ports = [7010]\n" if world.nat_with == "pasta" else ""  # (pasta's alone)
    # the name server the app asks: the host's (the world's remote holds its address), or
    # slirp4netns's forwarder, which asks the host's
    host_resolver = [a for a in net.nameservers(net.RESOLV_CONF) if "." in a][:1]
    resolver = [net.SLIRP_DNS] if world.nat_with == "slirp4netns" else [
        a for a in host_resolver if not a.startswith("127.")]
    found = world.probe(f'[net]\n{ports}deny_local = true\n', *ALL, *ALL6,
                        *(f"udp:{a}:53" for a in resolver))
    assert found["interfaces"] == ["eth0", "lo"]
    if ports:
        assert found["tcp:127.0.0.1:7010"] == "host-7010"  # host_ports
    else:
        assert refused(found["tcp:127.0.0.1:7010"])
    assert refused(found["tcp:127.0.0.1:7011"])  # another live host port: pasta's default
    assert found[f"tcp:{REMOTE}:7001"] == "remote-7001"
    assert found[f"tcp:{REMOTE}:7002"] == "remote-7002"
    assert found[f"udp:{REMOTE}:7005"] == "echo:q"
    assert refused(found[f"tcp:{HOST_SELF}:7012"])  # the host's own address: deny_host
    assert refused(found[f"tcp:{PRIVATE}:7001"])  # the LAN: deny_local
    if resolver and host_resolver and not host_resolver[0].startswith("127."):
        assert found[f"udp:{resolver[0]}:53"] == "echo:q"  # on the LAN, and reachable
    if world.nat_with == "pasta":  # and the same over IPv6 (slirp4netns: IPv4 only here)
        assert found[f"tcp:{REMOTE6}:7001"] == "remote-7001"
        assert refused(found[f"tcp:{HOST_SELF6}:7012"]) and refused(found[f"tcp:{PRIVATE6}:7001"])
    else:
        assert all(found[probe].startswith("error ") for probe in ALL6)


@real_nat
@pytest.mark.parametrize("world", ["pasta"], indirect=True)  # (the same with either)
def test_none_has_only_loopback_and_host_shares_the_hosts(world):
    none = world.probe('net = "none"\n', "tcp:127.0.0.1:7010", f"tcp:{REMOTE}:7001",
                       "interfaces")
    assert none["interfaces"] == ["lo"] and refused(none["tcp:127.0.0.1:7010"])
    assert none[f"tcp:{REMOTE}:7001"].startswith("error ENETUNREACH")
    host = world.probe('net = "host"\n', "tcp:127.0.0.1:7010", f"tcp:{REMOTE}:7001")
    assert host == {"tcp:127.0.0.1:7010": "host-7010", f"tcp:{REMOTE}:7001": "remote-7001",
                    "after": []}


UNDO = ("; for c in 'nft flush ruleset' 'tc qdisc del dev eth0 root' 'ip link set eth0 down'"
        " 'ip route del default' 'ip addr add 10.0.0.9/24 dev eth0'; do"
        " PATH=/usr/sbin:/sbin:$PATH $c >/dev/null 2>&1 && echo \"UNDONE $c\" || echo held; done")


@real_nat
def test_egress_rules_hold_and_the_app_cannot_undo_them(world):
    found = world.probe(f'[net]\ndeny = ["tcp:{REMOTE}:7002"]\ndeny_local = true\n', *ALL,
                        extra=UNDO)
    assert found[f"tcp:{REMOTE}:7001"] == "remote-7001"
    denied = found[f"tcp:{REMOTE}:7002"]
    assert refused(denied) and float(denied.split()[-1].rstrip("s")) < 1  # at once
    assert refused(found[f"tcp:{PRIVATE}:7001"])  # deny_local
    assert found["after"] == ["held"] * 5
    allowed = world.probe(f'[net]\nallow = ["tcp:{REMOTE}:7001"]\n', f"tcp:{REMOTE}:7001",
                          f"tcp:{REMOTE}:7002", f"tcp:{PRIVATE}:7001")
    assert allowed[f"tcp:{REMOTE}:7001"] == "remote-7001"
    assert refused(allowed[f"tcp:{REMOTE}:7002"]) and refused(allowed[f"tcp:{PRIVATE}:7001"])


@real_nat
@pytest.mark.parametrize("world", ["pasta"], indirect=True)  # (the same with either)
def test_exec_into_a_nat_instance_meets_the_same_rules(world):
    """What `bblctl exec` starts in the app's layer is fenced as the app is."""
    instance = world.detach(f'[net]\ndeny = ["tcp:{REMOTE}:7002"]\n', ["sleep", "600"])
    probes = world.ctl("exec", instance, "--", "sh", "-c",
                       f"{SYSTEM_PYTHON} /probe/probe.py tcp:{REMOTE}:7001 tcp:{REMOTE}:7002"
                       + UNDO)
    lines = probes.stdout.splitlines()
    found = json.loads(lines[0])
    assert found[f"tcp:{REMOTE}:7001"] == "remote-7001", probes
    assert refused(found[f"tcp:{REMOTE}:7002"])
    assert lines[1:] == ["held"] * 5
    assert world.ctl("stop", instance).returncode == 0


@real_nat
@pytest.mark.parametrize("world", ["pasta"], indirect=True)  # (the same with either)
def test_a_rate_slows_downloads_and_uploads_and_stays(world):
    transfers = [f"download:{REMOTE}:7003", f"upload:{REMOTE}:7004:{1 << 20}"]
    free = world.probe('net = "nat"\n', *transfers)
    shaped = world.probe('[net]\nrate = "4mbit"\n', *transfers, extra=UNDO)
    print("1 MiB unshaped:", free, "at 4mbit:", shaped)
    assert shaped[transfers[0]][0] == 1 << 20 and shaped[transfers[1]][0] == f"got {1 << 20}"
    # 1 MiB at 4 Mbit/s takes 2.1 s: at least 1.5 s; and not many times that (a queue that
    # drops what the NAT sends made the download take 33 s: netsetup.window)
    assert 1.5 <= shaped[transfers[0]][1] < 10 and 1.5 <= shaped[transfers[1]][1] < 10
    assert shaped["after"] == ["held"] * 5


@real_nat
@pytest.mark.parametrize("world", ["pasta"], indirect=True)  # (the same with either)
def test_a_delay_needs_netem_and_says_so(world):
    result = world.start('[net]\ndelay = "20ms"\n', ["true"])
    if result.returncode == 0:
        pytest.skip("this kernel has netem: the delay was added (its effect is not measured)")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result
    assert "delay: this kernel has no netem qdisc (sch_netem)" in result.stderr
    assert world.nat_processes() == []
    pytest.skip("this kernel has no netem (sch_netem): the refusal was checked, not a delay")


@real_nat
def test_forwards_reach_the_app_from_the_host(world):
    instance = world.detach('[net]\nforward = ["127.0.0.1:18080:8080"]\n',
                            [SYSTEM_PYTHON, "/probe/probe.py", "listen:8080"])

    def answer() -> str:  # (from the host's side; the app may still be starting to listen)
        return json.loads(world.run([sys.executable, os.path.join(HERE, "probe.py"),
                                     "tcp:127.0.0.1:18080"]).stdout)["tcp:127.0.0.1:18080"]

    assert wait_until(lambda: answer() == "inside")
    assert world.ctl("stop", instance).returncode == 0


@real_nat
@pytest.mark.parametrize("end", ["stop", "kill", "kill the monitor"])
def test_no_nat_outlives_its_instance(world, end):
    instance = world.detach('net = "nat"\n', ["sleep", "600"])
    nats = world.nat_processes()
    assert len(nats) == 1
    if end == "stop":
        assert world.ctl("stop", instance).returncode == 0
    elif end == "kill":
        assert world.ctl("kill", "--signal", "KILL", instance).returncode == 0
    else:
        monitor = int(open(f"/proc/{nats[0]}/stat").read().rsplit(")", 1)[1].split()[1])
        os.kill(monitor, signal.SIGKILL)
    assert wait_gone(nats) == []
    assert wait_until(lambda: instance not in world.ctl("ps").stdout)


@real_nat
@pytest.mark.parametrize("owner", ["an ancestor layer's", "its own"])
def test_the_nat_joins_whatever_user_namespace_owns_the_network(world, owner):
    """pasta and slirp4netns must run in an ancestor of the user namespace that owns the
    network namespace (from a sibling they are refused): the engine's caller is an ancestor
    of every layer's, however deep. A spec run by the engine itself, inside the world."""
    own = owner == "its own"
    inner = app_layer("net", namespaces=["user", "mount", "pid", "net"] if own else
                      ["mount", "pid", "net"], new_root=True, fs=[
                          *system_ops(), {"op": "ro-bind", "src": HERE, "dest": "/probe"}],
                      network={"nat": True, "nat_with": world.nat_with},
                      command=[SYSTEM_PYTHON, "/probe/probe.py", f"tcp:{REMOTE}:7001"])
    if not own:
        inner.pop("uid"), inner.pop("gid")
    spec_path = world.tmp / "nested.json"
    spec_path.write_text(json.dumps(sandbox(layer("top", namespaces=["user", "pid", "mount"],
                                                  uid=0, gid=0, layers=[inner]))))
    result = world.run([sys.executable, "-m", "bbld.engine", str(spec_path)])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {f"tcp:{REMOTE}:7001": "remote-7001"}
    assert world.nat_processes() == []  # (ended with the instance)


def test_an_unusable_tun_device_is_one_line_naming_the_fix(tmp_path, bbl_env):
    if not shutil.which("pasta"):
        pytest.skip("needs pasta (.ci/run installs passt)")
    world = World(tmp_path, bbl_env, tun_0600=True)
    try:
        result = world.start('net = "nat"\n', ["true"])
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert "layer 'layer3': network: nat needs /dev/net/tun, which uid" in result.stderr
        assert "chmod 0666 /dev/net/tun" in result.stderr
        assert world.nat_processes() == []
    finally:
        world.close()
