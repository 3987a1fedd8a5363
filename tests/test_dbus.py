"""D-Bus: `dbus = "none" | "host" | "filtered"`, the rules' grammar, what the host must give,
and, on a private bus with two real services, what an app can and cannot do through
xdg-dbus-proxy (tests/dbus/probe.py runs inside the sandbox)."""

import json
import os
import shutil
import signal
import subprocess
import uuid

import pytest

from bbld import gui, profile
from tests.conftest import TIMEOUT, processes_with, read_line, wait_gone, wait_until

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dbus")
SYSTEM_PYTHON = "/usr/bin/python3"


def _has_jeepney() -> bool:
    return os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import jeepney"], capture_output=True).returncode == 0


real_programs = pytest.mark.skipif(
    not (shutil.which("dbus-daemon") and shutil.which("xdg-dbus-proxy") and _has_jeepney()),
    reason="needs dbus-daemon, xdg-dbus-proxy and python3-jeepney (.ci/run installs them)")


def write(tmp_path, text: str, name: str = "p.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def fake_host(tmp_path):
    """An environment with a session bus that answers (a listening socket) and an
    xdg-dbus-proxy on PATH, for the pure tests."""
    import socket

    (tmp_path / "bin").mkdir()
    proxy = tmp_path / "bin" / "xdg-dbus-proxy"
    proxy.write_text("#!/bin/sh\n")
    proxy.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "bus"))
    listener.listen()
    (tmp_path / "run").mkdir()
    try:
        yield {"HOME": "/home/u", "PATH": str(tmp_path / "bin"),
               "XDG_RUNTIME_DIR": str(tmp_path / "run"),
               "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/bus,guid=0123",
               "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/bus"}
    finally:
        listener.close()


# ---------------------------------------------------------------- the profile's words

BROKEN = [
    ('[dbus]\ntalk = ["org.example.X", "not a name"]\n', 2,
     "dbus.talk[1]: 'not a name' is not a bus name"),
    ('[dbus]\nsee = [":1.5"]\n', 2, "dbus.see[0]: ':1.5' is not a bus name"),
    ('[dbus]\nown = ["org"]\n', 2, "dbus.own[0]: 'org' is not a bus name"),
    ('[dbus]\ncall = ["org.example.X"]\n', 2,
     "dbus.call[0]: 'org.example.X' must be NAME=RULE"),
    ('[dbus]\ncall = ["org.example.X=Open"]\n', 2,
     "dbus.call[0]: rule 'Open': must be [METHOD][@PATH]"),
    ('[dbus]\nbroadcast = ["org.example.X=*@org/example"]\n', 2,
     "dbus.broadcast[0]: rule '*@org/example': must be [METHOD][@PATH]"),
    ('[dbus]\nmode = "filtered"\n[dbus.system]\ntalk = ["1org.x"]\n', 4,
     "dbus.system.talk[0]: '1org.x' is not a bus name"),
    ('[dbus]\nmode = "host"\ntalk = ["org.example.X"]\n', 2,
     "dbus.mode: 'host' takes no rules"),
    ('app_id = "firefox"\ndbus = "filtered"\n', 1, "app_id: 'firefox' is not a D-Bus name"),
    ('dbus = "session"\n', 1, "dbus: Invalid enum value 'session'"),
    ('[dbus]\nfilter = true\n', 2, "dbus.filter: unknown key"),
]


@pytest.mark.parametrize("text, line, message", BROKEN, ids=[b[2][:32] for b in BROKEN])
def test_bad_names_and_rules_are_refused_with_file_and_line(tmp_path, fake_host, text, line,
                                                            message):
    path = write(tmp_path, text)
    with pytest.raises(profile.ProfileError) as err:
        profile.load(path, fake_host, 1000, 1000)
    assert any(p.startswith(f"{path}:{line}: {message}") for p in err.value.problems), \
        err.value.problems


def test_rules_xdg_dbus_proxy_takes_are_taken(tmp_path, fake_host):
    path = write(tmp_path, '''
app_id = "org.example.App"
[dbus]
see = ["org.example.Seen"]
talk = ["org.example.X", "org.freedesktop.Notifications", "org.mpris.MediaPlayer2.*"]
own = ["org.mpris.MediaPlayer2.app"]
call = ["org.example.Y=org.example.Y.Open@/org/example/Y", "org.example.Z=*",
        "org.example.W=@/org/example/*", "org.example.V=org.example.V.*", "org.example.*="]
broadcast = ["org.example.Y=org.example.Signals.*@/org/example/Y"]
log = true
[dbus.system]
talk = ["org.freedesktop.UPower"]
''')
    sandbox = profile.load(path, fake_host, 1000, 1000)
    layer1 = sandbox.layer
    layer2a, layer2h = layer1.layers[0].layers
    layer3 = layer2h.layers[0]
    layer4, layer4a = layer3.layers
    run = fake_host["XDG_RUNTIME_DIR"] + "/bbl"
    assert [(type(op).__name__, op.dest, op.mode) for op in layer1.fs] == [
        ("Tmpfs", run, 0o700)]
    assert layer2a.uid == 1000 and layer2a.companions[0].argv == [
        f"{tmp_path}/bin/xdg-dbus-proxy",
        fake_host["DBUS_SESSION_BUS_ADDRESS"], f"{run}/dbus-session", "--filter",
        "--see=org.example.Seen", "--talk=org.example.X",
        "--talk=org.freedesktop.Notifications", "--talk=org.mpris.MediaPlayer2.*",
        "--own=org.example.App.*", "--own=org.mpris.MediaPlayer2.app",
        "--call=org.example.Y=org.example.Y.Open@/org/example/Y", "--call=org.example.Z=*",
        "--call=org.example.W=@/org/example/*", "--call=org.example.V=org.example.V.*",
        "--call=org.example.*=",
        "--broadcast=org.example.Y=org.example.Signals.*@/org/example/Y", "--log",
        fake_host["DBUS_SYSTEM_BUS_ADDRESS"], f"{run}/dbus-system", "--filter",
        "--talk=org.freedesktop.UPower", "--log"]
    assert [(type(op).__name__, getattr(op, "src", None) or op.target_path, op.dest)
            for op in layer3.fs if op.origin == "dbus"] == [
        ("RoBind", run, "/run/bbl/helpers"),
        ("Symlink", "/run/bbl/helpers/dbus-session", "/run/user/1000/bus"),
        ("Symlink", "/run/bbl/helpers/dbus-system", "/run/dbus/system_bus_socket")]
    assert layer3.start_after == [] and layer4a.start_after == []  # (nothing to run there)
    assert layer4.start_after == ["/run/bbl/helpers/dbus-session",
                                  "/run/bbl/helpers/dbus-system"]
    assert layer4.uid == 1000
    assert {k: v for k, v in layer3.env.set.items() if "BUS" in k or "XDG" in k} == {
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus",
        "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/run/dbus/system_bus_socket",
        "XDG_RUNTIME_DIR": "/run/user/1000"}


def test_without_d_bus_there_is_no_proxy_and_no_bus(tmp_path, fake_host):
    sandbox = profile.load(write(tmp_path, 'command = ["true"]\n'), fake_host, 1000, 1000)
    layer2a = sandbox.layer.layers[0].layers[0]
    layer3 = sandbox.layer.layers[0].layers[1].layers[0]
    assert (sandbox.layer.fs, layer2a.companions, layer3.layers[0].start_after) == ([], [], [])
    assert not [k for k in layer3.env.set if k.startswith("DBUS")]


def test_what_the_host_lacks_is_one_line_naming_the_fix(tmp_path, fake_host):
    path = write(tmp_path, 'name = "x"\n\ndbus = "filtered"\n')

    def problem(**environ) -> str:
        with pytest.raises(profile.ProfileError) as err:
            profile.load(path, {**fake_host, **environ}, 1000, 1000)
        assert len(err.value.problems) == 1
        return err.value.problems[0]

    assert problem(PATH=str(tmp_path)) == (
        f"{path}:3: dbus: dbus = \"filtered\" runs xdg-dbus-proxy, which is not installed: "
        "apt install xdg-dbus-proxy (or dnf/pacman install xdg-dbus-proxy)")
    assert problem(DBUS_SESSION_BUS_ADDRESS="").startswith(
        f"{path}:3: dbus: there is no session bus: DBUS_SESSION_BUS_ADDRESS is not set")
    gone = f"unix:path={tmp_path}/gone"
    assert problem(DBUS_SESSION_BUS_ADDRESS=gone) == (
        f"{path}:3: dbus: the session bus (DBUS_SESSION_BUS_ADDRESS={gone}) does not answer "
        "(No such file or directory); start it, or leave it out of the profile")
    assert "is not a unix socket address" in problem(
        DBUS_SESSION_BUS_ADDRESS="tcp:host=localhost,port=1")
    path = write(tmp_path, '[dbus]\n[dbus.system]\ntalk = ["org.x.Y"]\n')
    assert problem(DBUS_SYSTEM_BUS_ADDRESS=gone).startswith(
        f"{path}:1: dbus: the system bus (DBUS_SYSTEM_BUS_ADDRESS={gone}) does not answer")
    path = write(tmp_path, 'dbus = "host"\n')
    assert problem(DBUS_SESSION_BUS_ADDRESS="unix:abstract=/tmp/dbus-x").startswith(
        f"{path}:1: dbus: the session bus (DBUS_SESSION_BUS_ADDRESS=unix:abstract=/tmp/dbus-x) "
        "does not answer")


def test_without_the_variable_the_session_bus_is_found_in_the_runtime_directory(tmp_path,
                                                                                fake_host):
    import socket

    run = tmp_path / "run"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(run / "bus"))
        listener.listen()
        environ = {**fake_host, "DBUS_SESSION_BUS_ADDRESS": ""}
        sandbox = profile.load(write(tmp_path, 'dbus = "filtered"\n'), environ, 1000, 1000)
    assert sandbox.layer.layers[0].layers[0].companions[0].argv[1] == f"unix:path={run}/bus"


@pytest.mark.parametrize("layers, problem", [
    ('[layer]\nname = "app"\nnamespaces = ["user"]\nuid = 0\ncommand = ["x"]\n'
     '[layer.env]\nset = { DBUS_SESSION_BUS_ADDRESS = "unix:path=/b" }\n',
     "4: layer 'app': runs as uid 0 with DBUS_SESSION_BUS_ADDRESS set, and a bus only lets in "
     "the uid it sees (1000): give the layer uid = 1000"),
    ('[layer]\nname = "top"\nnamespaces = ["user"]\nuid = 0\n'
     '[layer.env]\nset = { DBUS_SYSTEM_BUS_ADDRESS = "unix:path=/b" }\n'
     '[[layer.layers]]\nname = "app"\nnamespaces = ["mount"]\ncommand = ["x"]\n',
     "7: layer 'app': runs as uid 0 with DBUS_SYSTEM_BUS_ADDRESS set"),
])
def test_a_tree_that_hands_a_bus_to_another_uid_is_refused(tmp_path, layers, problem):
    path = write(tmp_path, layers)
    with pytest.raises(profile.ProfileError) as err:
        profile.load(path, {"HOME": "/home/u"}, 1000, 1000)
    assert err.value.problems[0].startswith(f"{path}:{problem}"), err.value.problems
    fixed = layers.replace("uid = 0", "uid = 1000")
    profile.load(write(tmp_path, fixed), {"HOME": "/home/u"}, 1000, 1000)  # no error


def test_bblctl_refuses_a_missing_bus_with_exit_2_and_starts_nothing(instances, tmp_path):
    path = write(tmp_path, 'command = ["true"]\ndbus = "filtered"\n')
    instances.env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={tmp_path}/none"
    for argv in (("profile", "validate", path), ("start", path)):
        result = instances.ctl(*argv)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "dbus: the session bus" in result.stderr
    assert not os.path.exists(os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl",
                                           "bbld.sock"))  # (no daemon was started for it)


# ---------------------------------------------------------------- a real bus


class Bus:
    """A private dbus-daemon listening on a socket file and an abstract name, with the two
    services of tests/dbus/services.py on it."""

    def __init__(self, tmp_path, role: str):
        self.path = str(tmp_path / f"{role}-bus")
        self.abstract = f"bbl-test-{uuid.uuid4().hex}"
        config = tmp_path / f"{role}.conf"
        config.write_text(f"""<!DOCTYPE busconfig PUBLIC
 "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={self.path}</listen>
  <listen>unix:abstract={self.abstract}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
""")
        self.procs = []
        daemon = self._start(["dbus-daemon", f"--config-file={config}", "--nofork",
                              "--print-address=1"])
        self.address = f"unix:path={self.path}"
        assert read_line(daemon.stdout).startswith("unix:")
        services = self._start([SYSTEM_PYTHON, os.path.join(HERE, "services.py"), self.address])
        assert read_line(services.stdout) == "ready\n"

    def _start(self, argv):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True)
        self.procs.append(proc)
        return proc

    def hidden(self) -> list[str]:
        return [f"path:{self.path}", f"abstract:{self.abstract}"]

    def close(self):
        for proc in reversed(self.procs):
            proc.kill()
            proc.wait(timeout=TIMEOUT)
            proc.stdout.close()


@pytest.fixture
def session_bus(tmp_path, instances):
    bus = Bus(tmp_path, "session")
    instances.env["DBUS_SESSION_BUS_ADDRESS"] = bus.address
    instances.env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    try:
        yield bus
    finally:
        bus.close()


def probe(instances, tmp_path, bus: Bus, options: str, which: str = "session",
          extra: str = "") -> dict:
    """What tests/dbus/probe.py finds on `which` bus from inside a sandbox with `options`."""
    argv = [SYSTEM_PYTHON, "/probe/probe.py", which, *bus.hidden()]
    path = write(tmp_path, f'''
app_id = "org.example.App"
command = ["sh", "-c", {json.dumps(" ".join(argv) + extra)}]
mounts = [{{ src = "{HERE}", dest = "/probe" }}]
{options}
''')
    result = instances.ctl("start", path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return {**json.loads(lines[0]), "after": lines[1:]}


DENIED = "error org.freedesktop.DBus.Error.AccessDenied"
UNKNOWN = "error org.freedesktop.DBus.Error.ServiceUnknown"


@real_programs
def test_a_filtered_session_bus_shows_and_lets_through_only_what_the_profile_says(
        instances, tmp_path, session_bus):
    clients = (" && gdbus call --session --dest org.example.X --object-path /org/example/X "
               "--method org.example.X.Ping && dbus-send --session --print-reply "
               "--dest=org.example.X /org/example/X org.example.X.Ping | grep -o 'X Ping'"
               # the proxy's socket cannot be replaced, and nothing else is beside it
               "; rm -f /run/bbl/helpers/dbus-session 2>&- || echo read-only"
               "; ls -A /run/bbl/helpers")
    found = probe(instances, tmp_path, session_bus, '[dbus]\ntalk = ["org.example.X"]\n',
                  extra=clients)
    assert found["variables"] == {"DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/"
                                  f"{os.getuid()}/bus"}
    assert found["reachable"] == []  # the bus itself: neither its file nor its abstract name
    assert found["names"] == ["org.example.X", "org.freedesktop.DBus"]
    assert found["has Y"] is False
    assert [found[f"X.{m}"] for m in ("Ping", "Allowed", "Other")] == [
        "org.example.X Ping", "org.example.X Allowed", "org.example.X Other"]
    assert [found[f"Y.{m}"] for m in ("Ping", "Allowed", "Other")] == [UNKNOWN] * 3
    assert found["own org.example.App.Sub"] == 1  # the app's own names (app_id)
    assert found["own org.example.Other"].startswith("error ")
    assert found["signals"] == ["org.example.X"]  # Y's, sent first, never came
    assert found["monitor"] == DENIED
    assert found["after"] == ["('org.example.X Ping',)", "X Ping",  # gdbus, dbus-send
                              "read-only", "dbus-session"]


@real_programs
def test_see_call_and_broadcast_rules_open_exactly_their_part(instances, tmp_path,
                                                             session_bus):
    seen = probe(instances, tmp_path, session_bus,
                 '[dbus]\ntalk = ["org.example.X"]\nsee = ["org.example.Y"]\n')
    assert seen["names"] == ["org.example.X", "org.example.Y", "org.freedesktop.DBus"]
    assert seen["has Y"] is True
    assert [seen[f"Y.{m}"] for m in ("Ping", "Allowed", "Other")] == [DENIED] * 3
    assert seen["signals"] == ["org.example.X"]
    ruled = probe(instances, tmp_path, session_bus, '''[dbus]
talk = ["org.example.X"]
call = ["org.example.Y=org.example.Y.Allowed@/org/example/Y"]
broadcast = ["org.example.Y=org.example.Signals.Changed@/org/example/*"]
''')
    assert [ruled[f"Y.{m}"] for m in ("Ping", "Allowed", "Other")] == [
        DENIED, "org.example.Y Allowed", DENIED]
    assert ruled["signals"] == ["org.example.Y", "org.example.X"]
    assert ruled["own org.example.Other"].startswith("error ")


@real_programs
def test_the_probes_see_a_whole_bus_with_host_and_none_without(instances, tmp_path,
                                                              session_bus):
    host = probe(instances, tmp_path, session_bus, 'dbus = "host"\n')
    assert "org.example.Y" in host["names"] and host["has Y"] is True
    assert host["Y.Ping"] == "org.example.Y Ping"
    assert host["own org.example.Other"] == 1
    assert host["signals"] == ["org.example.Y", "org.example.X"]
    none = probe(instances, tmp_path, session_bus, 'dbus = "none"\n', which="none")
    assert (none["variables"], none["reachable"]) == ({}, [])
    assert "names" not in none


@real_programs
def test_a_system_bus_goes_through_the_proxy_too(instances, tmp_path, session_bus):
    system = Bus(tmp_path, "system")
    instances.env["DBUS_SYSTEM_BUS_ADDRESS"] = system.address
    try:
        found = probe(instances, tmp_path, system, '''[dbus]
talk = ["org.example.X"]
[dbus.system]
talk = ["org.example.Y"]
''', which="system")
    finally:
        system.close()
    assert found["variables"]["DBUS_SYSTEM_BUS_ADDRESS"] == \
        "unix:path=/run/dbus/system_bus_socket"
    assert found["reachable"] == []
    assert found["names"] == ["org.example.Y", "org.freedesktop.DBus"]
    assert (found["X.Ping"], found["Y.Ping"]) == (UNKNOWN, "org.example.Y Ping")
    assert found["own org.example.App.Sub"].startswith("error ")  # (app_id: session only)


@real_programs
@pytest.mark.parametrize("end", ["stop", "kill the main command", "SIGKILL layer 1"])
def test_no_proxy_outlives_its_instance(instances, tmp_path, session_bus, end):
    path = write(tmp_path, 'command = ["sleep", "600"]\ndbus = "filtered"\n')
    started = instances.ctl("start", "--detach", path)
    assert started.returncode == 0, started.stderr
    instance = started.stdout.strip()
    helpers = os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl")
    proxies = processes_with(f"{helpers}/dbus-session")
    assert len(proxies) == 1
    listed = instances.ctl("exec", instance, "--", "dbus-send", "--session", "--print-reply",
                           "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus.ListNames")  # exec gets the same filter
    assert listed.returncode == 0, listed.stderr
    assert "org.freedesktop.DBus" in listed.stdout and "org.example" not in listed.stdout
    if end == "stop":
        assert instances.ctl("stop", instance).returncode == 0
    elif end == "kill the main command":
        assert instances.ctl("kill", instance).returncode == 0
    else:
        tree = json.loads(instances.ctl("tree", instance, "--json").stdout)
        os.kill(tree[0]["layers"][0]["pid"], signal.SIGKILL)
    assert wait_gone(proxies) == []
    assert wait_until(lambda: instance not in instances.ctl("ps").stdout)
    assert sorted(os.listdir(helpers)) == ["bbld.sock", "instances"]  # no socket left
    assert os.listdir(os.path.join(helpers, "instances")) == []


def test_doctor_says_whether_the_buses_answer(instances, tmp_path):
    import socket

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "bus"))
        listener.listen()
        instances.env.update(DBUS_SESSION_BUS_ADDRESS=f"unix:path={tmp_path}/bus",
                             DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-system-bus")
        result = instances.ctl("doctor", "--json")
    checks = {check["what"]: check for check in json.loads(result.stdout)}
    assert checks["session bus"]["level"] == "ok"
    assert checks["session bus"]["detail"] == f"unix:path={tmp_path}/bus answers"
    assert checks["system bus"]["level"] == "warn"
    assert "does not answer" in checks["system bus"]["detail"]


def test_the_documented_example_profiles_are_valid(tmp_path, fake_host, monkeypatch):
    import re
    import socket

    from bbld import cgroupfs, net

    # (the network examples' NAT, the nested display, xpra's display)
    for program in ("pasta", "Xephyr", "xpra", "Xvfb"):
        shutil.copy(os.path.join(fake_host["PATH"], "xdg-dbus-proxy"),
                    os.path.join(fake_host["PATH"], program))
    tun = tmp_path / "tun"
    tun.write_text("")
    monkeypatch.setattr(net, "TUN", str(tun))  # (a usable one, whatever this host's is)
    monkeypatch.setenv("BBL_CGROUP", str(tmp_path))  # (a delegated cgroup with everything)
    monkeypatch.setattr(profile, "_missing_sources", lambda *args: [])  # (the examples'
    # mounts are the reader's files)
    monkeypatch.setattr(gui, "_display_socket_problem", lambda *args: None)  # (and X's)
    monkeypatch.setattr(cgroupfs, "controllers", lambda base: ["pids", "memory", "cpu", "io"])
    display = socket.socket(socket.AF_UNIX)  # (a host display that answers)
    number = 4000 + os.getpid() % 1000
    display.bind(f"\0/tmp/.X11-unix/X{number}")
    display.listen()
    fake_host = {**fake_host, "DISPLAY": f":{number}"}
    docs = os.path.join(os.path.dirname(HERE), "..", "docs", "profiles.md")
    with open(docs) as f:
        examples = re.findall(r"```toml\n(.*?)```", f.read(), re.DOTALL)
    assert len(examples) >= 5
    try:
        for index, text in enumerate(examples):
            profile.load(write(tmp_path, text, f"example{index}.toml"), fake_host, 1000, 1000)
    finally:
        display.close()
