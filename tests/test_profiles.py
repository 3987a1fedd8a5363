"""Profiles: validation with file:line, the template they expand into, and bblctl start."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from bbld import profile
from tests.conftest import wait_until
from tests.test_instances import Session

BROKEN = [
    ('name = "x"\ngui = "sdl"\n', 2, "gui: Invalid enum value 'sdl'"),
    ('name = "x"\n\n[[mounts]]\nsrc = "/a"\n\n[[mounts]]\nsrc = 5\n', 7,
     "mounts[1].src: Expected `str`, got `int`"),
    ('name = "x"\ncolour = 1\n', 2, "colour: unknown key"),
    ('[masks]\nos_release = "yes"\n', 2, "masks.os_release: Expected `bool`, got `str`"),
    ('name = "x"\ndns = ["not-an-ip"]\n', 2, "dns[0]: 'not-an-ip' is not an IP address"),
    ('command = []\n', 1, "command: must name a program"),
    ('home = "relative"\n', 1, "home: 'relative' must be an absolute path"),
    ('name = "x"\n[[mounts]]\ntype = "bind"\nsrc = "/a"\ndest = "b/../c"\n', 5,
     "mounts[0].dest: 'b/../c' must be an absolute path"),
    ('name = "has space"\n', 1, "name: 'has space' must match"),
    ('[[mounts]]\ntype = "loop"\nsrc = "/a"\n', 2, "mounts[0].type: Invalid enum value 'loop'"),
    ('[env]\npass = ["A=B"]\n', 1, "env: 'A=B' is not a variable name"),
    ('limits = { pids = 0 }\n', 1, "limits.pids: must be a whole number >= 1"),
    ('limits = { forks = 5 }\n', 1, "limits: unknown limit 'forks'; known: pids, memory, "
     "memory_high, swap, cpu, io_weight, required, as,"),
]


@pytest.mark.parametrize("text, line, message", BROKEN, ids=[b[2][:30] for b in BROKEN])
def test_broken_profiles_name_file_line_and_field(tmp_path, text, line, message):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(profile.ProfileError) as err:
        profile.load(str(path), {"HOME": "/home/u"}, 1000, 1000)
    assert any(p.startswith(f"{path}:{line}: {message}") for p in err.value.problems), \
        err.value.problems


EVERY_PROBLEM = """name = 5
command = "sh"
home = "relative/dir"
mounts = [
  { src = "/nonexistent-bbl-a" },
  { src = 7 },
  { src = "~/x", dest = "rel", colour = "red" },
]
dns = ["1.1.1.1", 3, "nope"]
gui = { mode = "xephyr", size = "big" }

[masks]
openers = "no"
os_release = 1
"""


def test_validate_reports_every_problem_in_one_pass_in_the_files_order(tmp_path):
    """Types, unknown keys, words and the host's lacks, each at its own line (an element of
    an array at its element's line); a key's wrong words hide none of the others, and no
    host check runs on words that are wrong (gui here)."""
    path = tmp_path / "every.toml"
    path.write_text(EVERY_PROBLEM)
    with pytest.raises(profile.ProfileError) as err:
        profile.load(str(path), {"HOME": "/home/u"}, 1000, 1000)
    assert [p.removeprefix(f"{path}:") for p in err.value.problems] == [
        "1: name: Expected `str | null`, got `int`",
        "2: command: Expected `array | null`, got `str`",
        "3: home: 'relative/dir' must be an absolute path (or start with ~/)",
        "5: mounts[0].src: /nonexistent-bbl-a does not exist: create it, or fix the path",
        "6: mounts[1].src: Expected `str`, got `int`",
        "7: mounts[2].colour: unknown key; see docs/profiles.md for the keys there are",
        "9: dns[1]: Expected `str`, got `int`",
        "9: dns[2]: 'nope' is not an IP address",
        "10: gui.size: 'big' must be WIDTHxHEIGHT, e.g. \"1280x800\"",
        "13: masks.openers: Expected `bool`, got `str`",
        "14: masks.os_release: Expected `bool`, got `int`"]


@pytest.mark.parametrize("text, where, line", [
    ("a = [1, 2,\n 3]\n", "$.a[2]", 2),
    ('a = ["x,[", 2,\n 3]  # ]\n', "$.a[2]", 2),
    ("a = [\n  { b = [1, 2] },\n  { b = 3 },\n]\n", "$.a[1].b", 3),
    ("a = [1]\n", "$.a[5]", 1),
    ("[[t]]\nc = 1\n[[t]]\nc = 2\n", "$.t[1].c", 4),
])
def test_line_of_finds_array_elements_and_tables(text, where, line):
    assert profile.line_of(text, where) == line


def test_a_start_failing_on_a_profile_key_names_its_file_and_line(instances, tmp_path):
    path = tmp_path / "dest.toml"
    path.write_text('command = ["true"]\nmounts = [\n  { src = "/usr/share", dest = '
                    '"/dev/null/x" },\n]\n')
    result = instances.ctl("start", str(path), stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stderr) == (1, f"bblctl: {path}:3: mounts[0] (ro-bind) "
                                                     "/dev/null/x: Not a directory "
                                                     "(layer 'layer3')\n")


def test_invalid_toml_and_a_broken_custom_tree(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\ngui = \n')
    with pytest.raises(profile.ProfileError) as err:
        profile.load(str(path))
    assert err.value.problems[0].startswith(f"{path}:2: not valid TOML")
    path.write_text('[layer]\nname = "only"\nfs = [{ op = "bind", src = "/a", dest = "b" }]\n')
    with pytest.raises(profile.ProfileError) as err:
        profile.load(str(path))
    assert f"{path}: layer 'only': fs[0] (bind): dest: 'b' must be an absolute path" in \
        err.value.problems


def test_validate_reports_and_exits_2(instances, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\ndns = ["nope"]\n[[mounts]]\nsrc = "rel"\n')
    result = instances.ctl("profile", "validate", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [  # (in the file's order)
        f"{path}:2: dns[0]: 'nope' is not an IP address",
        f"{path}:4: mounts[0].src: 'rel' must be an absolute path (or start with ~/)"]
    assert instances.ctl("profile", "validate", "default").stdout == "default: valid\n"
    assert instances.ctl("start", str(path)).returncode == 2


def test_profiles_are_found_by_name_and_shown_expanded(instances, tmp_path):
    config = tmp_path / "config" / "bbl" / "profiles"
    config.mkdir(parents=True)
    (config / "mine.toml").write_text('command = ["true"]\nname = "work"\n')
    (config / "broken.toml").write_text('command = ["true"]\nnet = "sometimes"\n')
    instances.env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    table = instances.ctl("profile", "list").stdout.splitlines()
    assert table[0].split() == ["PROFILE", "INSTANCE", "FILE", "STATE"]
    rows = {line.split()[0]: line.split(maxsplit=3)[1:] for line in table[1:]}
    assert rows["mine"] == ["work", str(config / "mine.toml"), "ok"]
    assert rows["broken"][:2] == ["-", str(config / "broken.toml")]
    assert rows["broken"][2].startswith("broken: net: ") and rows["default"][2] == "ok"
    assert instances.ctl("profile", "show", "mine").stdout == 'command = ["true"]\nname = "work"\n'
    expanded = instances.ctl("profile", "show", "mine", "--expanded").stdout
    assert '"main": "layer4"' in expanded and '"name": "layer3"' in expanded
    missing = instances.ctl("profile", "show", "nope")
    assert missing.returncode == 2 and "no profile named 'nope'" in missing.stderr


def write_profile(tmp_path, text: str) -> str:
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return str(path)


def test_user_options_as_seen_from_the_app(instances, tmp_path):
    home, shared, secret = tmp_path / "home", tmp_path / "shared", tmp_path / "secret"
    for directory in (home, shared, home / "work"):  # a mount point in a host directory
        directory.mkdir()                                # must exist there already
    (shared / "note").write_text("shared\n")
    secret.write_text("secret\n")
    (home / "kept").write_text("home\n")
    script = ("cat ~/kept; cat /srv/shared/note; touch /srv/shared/x 2>&- || echo ro; "
              "touch ~/work/y && echo rw; cat " + str(secret) + " 2>&- || echo masked; "
              "echo $BBL_PASSED $BBL_SET ${BBL_OTHER:-unset}; cat /etc/resolv.conf; "
              "cat /etc/machine-id; grep -c : /proc/net/dev; [ -d /opt ] && echo opt; "
              "command -v xdg-open || echo no-opener; pwd")
    path = write_profile(tmp_path, f'''
name = "options"
command = ["sh", "-c", {json.dumps(script)}]
home = "{home}"
opt = true
net = "none"
dns = ["192.0.2.53"]
[[mounts]]
src = "{shared}"
dest = "/srv/shared"
[[mounts]]
type = "bind"
src = "{shared}"
dest = "~/work"
[masks]
paths = ["{secret}"]
[env]
pass = ["BBL_PASSED"]
set = {{ BBL_SET = "set" }}
''')
    instances.env.update(BBL_PASSED="passed", BBL_OTHER="other")
    result = instances.ctl("start", path, stdin=open(os.devnull))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "home", "shared", "ro", "rw", "masked", "passed set unset", "nameserver 192.0.2.53",
        "0" * 32, "1", "opt", "no-opener", instances.env["HOME"]]
    assert (shared / "y").exists()  # the bind is writable through to the host


def test_the_templates_layers(instances, tmp_path):
    path = write_profile(tmp_path, '''
command = ["sleep", "600"]
companions = [["sleep", "600"]]
untrusted_companions = [["sleep", "600"]]
''')
    instance = instances.ctl("start", path, "--detach").stdout.strip()
    instances.ids.append(instance)
    probe = ("id -u; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | cut -f2; "
             "for ns in user pid net mnt; do readlink /proc/self/ns/$ns; done")
    seen = {}
    for name in ("layer1", "layer2", "layer2a", "layer2h", "layer3", "layer4", "layer4a"):
        result = instances.ctl("exec", "--layer", name, instance, "--", "sh", "-c", probe)
        assert result.returncode == 0, (name, result.stderr)
        uid, cap, nnp, seccomp, user, pid, net, mnt = result.stdout.split()
        seen[name] = dict(uid=uid, cap=cap, nnp=nnp, seccomp=seccomp, user=user, pid=pid,
                          net=net, mnt=mnt)
    me = str(os.getuid())
    assert [seen[n]["uid"] for n in seen] == ["0", "0", me, "0", "0", me, me]
    assert {seen[n]["cap"] for n in seen} == {"0000000000000000"}  # commands keep none
    assert {seen[n]["nnp"] for n in seen} == {"1"}
    assert [n for n in seen if seen[n]["seccomp"] == "2"] == ["layer4", "layer4a"]
    host = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("user", "pid", "net", "mnt")}
    assert len({seen[n]["user"] for n in ("layer1", "layer2", "layer2h", "layer3")}) == 1
    users = [seen[n]["user"] for n in ("layer1", "layer2a", "layer4", "layer4a")]
    assert len(set(users)) == 4 and host["user"] not in users
    assert seen["layer1"]["pid"] == seen["layer2"]["pid"] == seen["layer2h"]["pid"]
    assert len({seen[n]["pid"] for n in ("layer1", "layer3", "layer4", "layer4a")}) == 4
    assert len({seen[n]["mnt"] for n in seen}) == 7  # every layer its own view
    outside = {seen[n]["net"] for n in ("layer1", "layer2", "layer2a", "layer2h")}
    inside = {seen[n]["net"] for n in ("layer3", "layer4", "layer4a")}
    assert outside == {host["net"]} and len(inside) == 1 and inside != outside  # net = none
    # Nothing runs in layer1, layer2, layer2h and layer3: layer2 and layer2h are built by
    # their parent's process, layer1's and layer3's supervisors became minimal inits (exec
    # above still entered them all); tree reads each layer's fate from the instance's data
    drawn = instances.ctl("tree", instance).stdout
    for pattern in (r"\n  layer1  pid \d+ \(a minimal init\)  uid 0:0  new: mnt pid user\n",
                    r"\n    layer2  no process \(built by its parent\)  uid 0:0  new: mnt\n",
                    r"\n      layer2h  no process \(built by its parent\)",
                    r"\n        layer3  pid \d+ \(a minimal init\)  uid 0:0  new: cgroup ipc "
                    r"mnt net pid uts\n",
                    r"\n          layer4  pid \d+  uid \d+:\d+  new: mnt pid user\n"):
        assert re.search(pattern, drawn), drawn
    assert max(len(line) for line in drawn.splitlines() if "·" not in line) <= 100


def test_start_default_detached_then_exec(instances):
    started = instances.ctl("start", "default", "--detach", "--name", "shell")
    assert started.returncode == 0, started.stderr
    instance = started.stdout.strip()
    instances.ids.append(instance)
    (entry,) = json.loads(instances.ctl("ps", "--json").stdout)
    assert (entry["id"], entry["name"], entry["layers"]) == (instance, "shell", 7)
    result = instances.ctl("exec", "shell", "--", "sh", "-c",
                           "id -u; echo $HOME; ls ~ | wc -l; hostname")
    # (--name is the instance's name, and its hostname: the profile's is "default")
    assert result.stdout.split() == [str(os.getuid()), instances.env["HOME"], "0", "shell"]


def test_instances_by_id_prefix_name_and_ambiguity_and_stop_says_what_it_did(
        instances, tmp_path):
    path = tmp_path / "idle.toml"
    path.write_text('command = ["sleep", "600"]\n')
    ids = []
    for _ in range(2):
        ids.append(instances.ctl("start", str(path), "--detach").stdout.strip())
        instances.ids.append(ids[-1])
    alive = instances.ctl("kill", "--signal", "0", ids[0][:6])  # a unique prefix, signal 0
    assert (alive.returncode, alive.stderr) == (0, "")
    same = instances.ctl("kill", "--signal", "0", "idle")  # the name both have
    assert same.returncode == 2 and same.stderr.count("\n") == 1, same
    assert "bblctl: 'idle' fits 2 running instances (" in same.stderr
    assert all(f"{i} idle" in same.stderr for i in ids) and "give an id" in same.stderr
    common = os.path.commonprefix(ids)
    if common:  # (two random ids may share a first digit)
        assert instances.ctl("kill", "--signal", "0", common).returncode == 2
    (tree,) = json.loads(instances.ctl("tree", ids[1][:8], "--json").stdout)  # (a prefix)
    assert tree["id"] == ids[1]
    assert instances.ctl("tree", "idle").stderr.startswith("bblctl: 'idle' fits 2 running")
    stopped = instances.ctl("stop", ids[0][:8], "--timeout", "5")
    assert stopped.returncode == 0 and stopped.stderr.splitlines()[-1] == (
        f"bblctl: {ids[0][:8]}: terminated (status 143)"), stopped.stderr
    gone = instances.ctl("kill", "--signal", "0", ids[0])
    assert gone.returncode == 2 and "no running instance" in gone.stderr


def test_start_in_the_foreground_gives_the_app_a_terminal(instances):
    session = Session(["start", "default"], instances.env)
    try:
        session.expect("$ ")
        session.send("tty; echo $((6*7))\r")
        out = session.expect("42")
        assert "/dev/pts/0" in out
        session.expect("$ ")
        session.send("exit 3\r")
        assert session.proc.wait(timeout=30) == 3
    finally:
        session.close()
    deadline = time.monotonic() + 10
    while json.loads(instances.ctl("ps", "--json").stdout):
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("desktop-file-validate") is None,
                    reason="desktop-file-utils is not installed")
def test_desktop_launchers_validate_and_shadow_the_original(instances, tmp_path):
    import subprocess

    instances.env["XDG_DATA_HOME"] = str(tmp_path / "data")
    original = tmp_path / "editor.desktop"
    original.write_text("[Desktop Entry]\nType=Application\nName=Editor\nName[de]=Editor DE\n"
                        "Exec=/usr/bin/editor %F\nTryExec=/usr/bin/editor\nIcon=editor\n"
                        "MimeType=text/plain;\nStartupWMClass=EditorWin\nDBusActivatable=true\n"
                        "Actions=new;\n\n[Desktop Action new]\nName=New\nExec=/usr/bin/editor -n\n")
    result = instances.ctl("desktop", "install", "default", "--from", str(original))
    assert result.returncode == 0, result.stderr
    launcher = tmp_path / "data" / "applications" / "editor.desktop"
    assert result.stdout == f"{launcher}\n"
    text = launcher.read_text()
    exec_line = next(line for line in text.splitlines() if line.startswith("Exec="))
    assert exec_line.endswith(" start default -- %U") and "/usr/bin/editor" not in text
    for kept in ("Name=Editor", "Name[de]=Editor DE", "Icon=editor", "MimeType=text/plain;",
                 "StartupWMClass=EditorWin", "DBusActivatable=false"):
        assert kept in text.splitlines()
    assert "Actions" not in text and "TryExec" not in text
    check = subprocess.run(["desktop-file-validate", str(launcher)], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0 and check.stdout == "", check.stdout
    plain = instances.ctl("desktop", "install", "default")
    assert plain.stdout == f"{tmp_path / 'data' / 'applications' / 'bbl-default.desktop'}\n"
    bad = instances.ctl("desktop", "install", "nope")
    assert bad.returncode == 2 and "no profile named 'nope'" in bad.stderr


def test_a_second_start_of_a_single_instance_profile_forwards_its_arguments(instances,
                                                                             tmp_path):
    from tests.test_instances import app_script, lines

    script = app_script(tmp_path)
    path = write_profile(tmp_path, f'''
name = "single"
instance = "single"
command = ["{script}"]
mounts = [{{ type = "bind", src = "{tmp_path}" }}]
''')
    first = instances.ctl("start", path, "--detach", "--", "one")
    assert first.returncode == 0, first.stderr
    instances.ids.append(first.stdout.strip())
    deadline = time.monotonic() + 30
    while lines(tmp_path / "log") != ["got one"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = instances.ctl("start", path, "--", "two", "https://example.org/?a b")
    assert second.returncode == 0, second.stderr
    assert lines(tmp_path / "log") == ["got one", "got two https://example.org/?a b"]
    assert len(json.loads(instances.ctl("ps", "--json").stdout)) == 1


def test_every_path_hands_the_running_app_only_the_new_arguments(instances, tmp_path):
    """One rule for a second start and send-args: the profile's whole command runs again
    with the new arguments alone (a `sh -c` command with arguments of its own included;
    like an app that hands them to its first instance, the later runs end at once)."""
    log = tmp_path / "log"
    script = (f'echo \\"started with: $*\\" >> {log}; [ -e {log}.up ] && exit 0; '
              f'touch {log}.up; exec sleep 600')
    path = write_profile(tmp_path, f'''
name = "notes"
instance = "single"
command = ["sh", "-c", "{script}", "sh", "own"]
mounts = [{{ type = "bind", src = "{tmp_path}" }}]
''')
    first = instances.ctl("start", path, "--detach", "--", "a")
    assert first.returncode == 0, first.stderr
    instances.ids.append(first.stdout.strip())
    assert wait_until(lambda: log.exists() and log.read_text() == "started with: own a\n")
    second = instances.ctl("start", path, "--", "c d", "e")
    sent = instances.ctl("send-args", "notes", "--", "f", "g h")
    assert second.returncode == 0 and sent.returncode == 0, (second, sent)
    assert wait_until(lambda: len(log.read_text().splitlines()) == 3)
    assert sorted(log.read_text().splitlines()[1:]) == [
        "started with: own c d e", "started with: own f g h"]


def test_gui_dbus_and_hardware_options(instances, tmp_path):
    import socket

    bus_path = tmp_path / "bus"
    bus = socket.socket(socket.AF_UNIX)
    bus.bind(str(bus_path))
    bus.listen()  # (a bus that does not answer is refused)
    def entry(family: int, address: bytes, number: bytes, data: bytes) -> bytes:
        fields = (address, number, b"MIT-MAGIC-COOKIE-1", data)
        return family.to_bytes(2, "big") + b"".join(len(f).to_bytes(2, "big") + f
                                                    for f in fields)

    cookie = tmp_path / "Xauthority"
    cookie.write_bytes(entry(256, b"myhost", b"97", b"\x00\xffsecret97")
                       + entry(256, b"myhost", b"98", b"other display"))
    (tmp_path / "expected").write_bytes(entry(0xFFFF, b"", b"97", b"\x00\xffsecret97"))
    instances.env.update(DISPLAY=":97", XAUTHORITY=str(cookie),
                         DBUS_SESSION_BUS_ADDRESS=f"unix:path={bus_path},guid=1")
    script = ("echo $DISPLAY $XAUTHORITY $DBUS_SESSION_BUS_ADDRESS; "
              "cmp -s $XAUTHORITY /out/expected && echo cookie-filtered; "
              "echo x >> $XAUTHORITY 2>&- || echo cookie-read-only; "
              "[ -S $XDG_RUNTIME_DIR/bus ] && echo bus; [ -d /sys/class ] && echo sys; "
              "touch /sys/x 2>&- || echo sys-read-only; grep -c ID=linux /etc/os-release")
    path = write_profile(tmp_path, f'''
command = ["sh", "-c", {json.dumps(script)}]
gui = "host-x11"
dbus = "host"
hardware = "all"
mounts = [{{ src = "{tmp_path}", dest = "/out" }}]
''')
    import socket

    display = socket.socket(socket.AF_UNIX)  # (display :97's socket: host-x11 wants one)
    try:
        display.bind("/tmp/.X11-unix/X97")
        result = instances.ctl("start", path, stdin=open(os.devnull))
    finally:
        bus.close()
        display.close()
        if os.path.exists("/tmp/.X11-unix/X97"):
            os.unlink("/tmp/.X11-unix/X97")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f":97 /run/bbl/Xauthority unix:path=/run/user/{os.getuid()}/bus", "cookie-filtered",
        "cookie-read-only", "bus", "sys", "sys-read-only", "1"]


def test_with_bbld_running_it_expands_the_profile_in_the_callers_environment(instances,
                                                                            tmp_path):
    """The daemon finds and expands the profile (the client imports no spec), with the
    caller's environment and working directory, not its own."""
    import subprocess

    from tests.conftest import BBLCTL

    instances.ctl("ps")  # bbld runs, started with the test's environment
    config = tmp_path / "config"
    (config / "bbl" / "profiles").mkdir(parents=True)
    (config / "bbl" / "profiles" / "mine.toml").write_text('command = ["echo", "mine"]\n')
    (tmp_path / "here.toml").write_text('command = ["echo", "here"]\n')
    (tmp_path / "bad.toml").write_text('command = ["true"]\nnet = "sometimes"\n')
    env = {**instances.env, "XDG_CONFIG_HOME": str(config)}

    def start(*argv):
        return subprocess.run([*BBLCTL, "start", *argv], env=env, cwd=tmp_path, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL, timeout=60)

    ended_before = len(json.loads(instances.ctl("ps", "--all", "--json").stdout))
    assert start("mine").stdout == "mine\n"
    assert start("here.toml").stdout == "here\n"
    bad = start("bad.toml")
    assert bad.returncode == 2 and "bad.toml:2: net: Invalid enum value" in bad.stderr
    assert len(json.loads(instances.ctl("ps", "--all", "--json").stdout)) == ended_before + 2


def test_a_missing_source_is_the_profiles_own_key_and_line(instances, tmp_path):
    """A home or mount source the host lacks is the profile's problem, found before the
    start, every one, in validate too: FILE:LINE: key (not `layer3 fs[14]`)."""
    path = tmp_path / "m.toml"
    path.write_text('command = ["true"]\nmounts = [{ src = "/usr" }, '
                    '{ src = "/nonexistent-bbl", dest = "/x" }]\nhome = "/nonexistent-home"\n')
    for argv in (("start", str(path)), ("profile", "validate", str(path))):
        result = instances.ctl(*argv, stdin=subprocess.DEVNULL)
        assert result.returncode == 2
        lines = result.stderr.splitlines()  # (the first after "bblctl start: " where the
        # client expanded the profile itself)
        assert len(lines) == 2 and lines[0].endswith(
            f"{path}:2: mounts[1].src: /nonexistent-bbl does not exist: create it, or fix "
            "the path") and lines[1].endswith(
            f"{path}:3: home: /nonexistent-home is not a directory: create it (mkdir -p), or "
            "fix the path"), result.stderr


def test_a_toml_syntax_error_is_file_and_line(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\ncommand = ["a"\nhome = "tmpfs"\n')
    with pytest.raises(profile.ProfileError) as err:
        profile.load(str(path), {"HOME": "/home/u"}, 1000, 1000)
    assert err.value.problems == [f"{path}:2: not valid TOML: Unclosed array"]  # (opened)
    path.write_text('name = "x"\nhome = \n')
    with pytest.raises(profile.ProfileError) as err:
        profile.load(str(path), {"HOME": "/home/u"}, 1000, 1000)
    assert err.value.problems == [f"{path}:2: not valid TOML: Invalid value"]


def test_start_runs_the_given_command_where_the_profile_names_none(instances, tmp_path):
    """The interactive shell is only the default: `start default -- CMD` runs CMD; a profile
    with a command gets the arguments as the app's."""
    ran = instances.ctl("start", "default", "--", "sh", "-c", "echo ran $0", "zero",
                        stdin=open(os.devnull))
    assert (ran.returncode, ran.stdout) == (0, "ran zero\n"), ran
    path = tmp_path / "echo.toml"
    path.write_text('command = ["echo", "app:"]\n')
    given = instances.ctl("start", str(path), "--", "a", "b c", stdin=open(os.devnull))
    assert (given.returncode, given.stdout) == (0, "app: a b c\n"), given
