"""Graphical apps: `gui = "xephyr"` gives the app a display of its own, a nested X server in
a trusted helper layer shown as one window on the host's display. Proven on a real display:
an Xvfb of the test's own (its own cookie) stands for the host's; what the app draws shows in
the nested window and nowhere else, and from inside nothing of the host's display is in
reach (`host-x11`, the control, shows the same probes do see a leak)."""

import json
import os
import re
import shutil
import signal
import subprocess

import msgspec
import pytest

from bbld import gui, profile
from tests.conftest import TIMEOUT, wait_gone, wait_until

X_PROGRAMS = ("Xvfb", "Xephyr", "xauth", "xdpyinfo", "xsetroot", "xdotool", "import",
              "xmessage", "xlsclients")
real_display = pytest.mark.skipif(
    not all(shutil.which(p) for p in X_PROGRAMS),
    reason="needs Xvfb, Xephyr, xauth, x11-utils, x11-xserver-utils, xdotool and imagemagick "
           "(.ci/run installs them)")
RED, BLUE = "#FF0000", "#0000FF"
HOST_BACKGROUND = "#50647D"  # (the host's screen, told apart from a nested one's black)


def write(tmp_path, text: str, name: str = "p.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- the words


@pytest.mark.parametrize("text, line, problem", [
    ('[gui]\nsize = "big"\n', 2, "gui.size: 'big' must be WIDTHxHEIGHT"),
    ('[gui]\nmode = "host-x11"\nresizable = false\n', 3, "gui.resizable: needs mode = \"xephyr\""),
    ('gui = "xephyr"\nnet = "host"\n', 1, "gui: \"xephyr\" with net = \"host\": the app could "
     "reach the host's display through its abstract socket"),
    ('gui = "host-x11-untrusted"\nnet = "host"\n', 1, "gui: \"host-x11-untrusted\" with net = "
     "\"host\": the app could reach the host's display through its abstract socket"),
    ('gui = "x11"\n', 1, "gui: Invalid enum value 'x11'"),
    ('[gui]\nclipboard = "both"\n', 2, "gui.clipboard: needs mode = \"xpra\" (mode 'xephyr'"),
    ('[gui]\nmode = "xpra"\nsession = ["twm"]\n', 3, "gui.session: needs mode = \"xephyr\""),
    ('[gui]\nmode = "xpra"\nclipboard = "all"\n', 3, "gui.clipboard: Invalid enum value"),
    ('gui = "xpra"\nnet = "host"\n', 1, "gui: \"xpra\" with net = \"host\": the app could "
     "reach the host's display through its abstract socket"),
    ('[gui]\nwm = "twm"\n', 2, "gui.wm: unknown key"),
])
def test_bad_words_are_refused_with_file_and_line(tmp_path, text, line, problem):
    path = write(tmp_path, text)
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(path, {"HOME": "/home/u", "PATH": os.defpath, "DISPLAY": ":0"})
    assert caught.value.problems[0].startswith(f"{path}:{line}: {problem}"), \
        caught.value.problems


@pytest.mark.parametrize("environ, problem", [
    ({"PATH": "/nonexistent"}, "xephyr needs Xephyr, which is not installed: apt install "
                               "xserver-xephyr"),
    ({}, "xephyr shows windows on the host's display, and DISPLAY names none"),
    ({"DISPLAY": ":97"}, "xephyr reaches the host's display :97 through its abstract socket"),
    ({"PATH": "/nonexistent", "MODE": "xpra"}, "xpra needs xpra, which is not installed: apt "
                                               "install xpra"),
    ({"MODE": "xpra"}, "xpra shows windows on the host's display, and DISPLAY names none"),
    ({"MODE": "host-x11"}, "host-x11 binds the host display's socket, and DISPLAY names none "
                           "('unset'): start it from the desktop session"),
    ({"MODE": "host-x11", "DISPLAY": ":97"}, "host-x11 binds the host display's socket "
                                             "/tmp/.X11-unix/X97, which is not there"),
])
def test_what_the_host_lacks_is_one_line_naming_the_fix(tmp_path, environ, problem):
    environ = dict(environ)
    mode = environ.pop("MODE", "xephyr")
    if "PATH" not in environ and not all(shutil.which(p) for p in (gui.NESTED, "xpra")):
        pytest.skip("needs Xephyr and xpra (.ci/run installs them)")
    path = write(tmp_path, f'gui = "{mode}"\n')
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(path, {"HOME": "/home/u", "PATH": os.defpath, **environ})
    assert caught.value.problems == [f"{path}:1: gui: {problem}"] or \
        caught.value.problems[0].startswith(f"{path}:1: gui: {problem}"), caught.value.problems


def test_the_cookie_is_the_instances_own_in_the_wildcard_family():
    entry = gui.xauthority_entry("1", b"k" * 16)
    assert entry[:2] == b"\xff\xff"  # FamilyWild: the sandbox's own hostname matches too
    assert gui.xauthority_for(entry, "1") == entry and gui.xauthority_for(entry, "0") \
        == b""


# ---------------------------------------------------------------- on a real display


class Display:
    """An Xvfb of the test's own, with a cookie of its own: the host's display."""

    def __init__(self, tmp_path):
        self.number = _free_display()
        self.authority = str(tmp_path / "host.xauth")
        cookie = os.urandom(16).hex()
        subprocess.run(["xauth", "-f", self.authority, "add", f":{self.number}", ".", cookie],
                       check=True, capture_output=True)
        self.proc = subprocess.Popen(
            # (-noreset: as a desktop's display, it keeps the cookies it made when its last
            # client leaves)
            ["Xvfb", f":{self.number}", "-screen", "0", "1024x768x24", "+extension",
             "SECURITY", "-auth", self.authority, "-nolisten", "tcp", "-noreset"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {"DISPLAY": f":{self.number}", "XAUTHORITY": self.authority}
        assert wait_until(lambda: self.run("xdpyinfo").returncode == 0), "Xvfb did not start"
        self.run("xsetroot", "-solid", HOST_BACKGROUND)  # (kept: -noreset)

    def run(self, *argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=TIMEOUT, **kw)

    def pixel(self, x: int, y: int) -> str:
        out = self.run("import", "-window", "root", "-crop", f"1x1+{x}+{y}", "+repage",
                       "-depth", "8", "txt:-").stdout
        found = re.search(r"#[0-9A-F]{6}", out)
        return found.group(0) if found else out

    def wait_window(self, name: str, timeout: float = 30) -> tuple[int, dict]:
        """The host window whose title contains `name`, once it is there."""
        assert wait_until(lambda: self.run("xdotool", "search", "--name",
                                           re.escape(name)).stdout.strip(), timeout), name
        return self.window(name)

    def window(self, name: str) -> tuple[int, dict]:
        """The host window whose title contains `name`: its id and geometry."""
        found = self.run("xdotool", "search", "--name", re.escape(name)).stdout.split()
        assert len(found) == 1, found
        geometry = self.run("xdotool", "getwindowgeometry", "--shell", found[0]).stdout
        values = dict(line.split("=") for line in geometry.split())
        return int(found[0]), {k: int(v) for k, v in values.items() if k != "SCREEN"}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=TIMEOUT)

    def keep_screenshot(self, mode: str) -> None:
        """The host's whole screen as docs/screenshots/gui-MODE.png shows it: written when
        BBL_SCREENSHOTS names a directory (the docs' pictures are taken by the tests)."""
        directory = os.environ.get("BBL_SCREENSHOTS")
        if directory:
            self.run("import", "-window", "root", os.path.join(directory, f"gui-{mode}.png"))


def _free_display() -> int:
    for number in range(20, 99):
        if not os.path.exists(f"/tmp/.X11-unix/X{number}") and not os.path.exists(
                f"/tmp/.X{number}-lock"):
            return number
    raise AssertionError("no free display number")


@pytest.fixture
def display(tmp_path):
    made = Display(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def host_secret(display):
    """A host window (an xmessage named hostsecret) the app must not find."""
    secret = subprocess.Popen(["xmessage", "-name", "hostsecret", "host"],
                              env={**os.environ, **display.env})
    try:
        assert wait_until(lambda: "hostsecret" in display.run("xlsclients", "-l").stdout)
        yield secret
    finally:
        secret.kill()
        secret.wait()


def probe_inside(instances, instance, display) -> list[str]:
    """From inside: DISPLAY, the X sockets, the display's size, then what must fail: the
    host's display, a connection without the cookie, a host window among the clients."""
    return instances.ctl("exec", instance, "--", "sh", "-c",
                         INSIDE.format(host=display.number)).stdout.split("\n")


def xephyr_processes() -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if os.path.basename(argv[0]) == b"Xephyr" and \
                    os.stat(f"/proc/{entry}").st_uid == os.getuid():
                found.append(int(entry))
        except OSError:
            continue
    return found


def start(instances, display, tmp_path, options: str, command: list[str]) -> str:
    path = write(tmp_path, f"command = {json.dumps(command)}\n{options}", "app.toml")
    instances.env.update(display.env)
    started = instances.ctl("start", "--detach", path)
    assert started.returncode == 0, started.stderr
    instances.ids.append(started.stdout.strip())  # (stopped at the end if the test fails)
    return instances.ids[-1]


# a window of the app's own, filled red: ImageMagick's display
WINDOW = ["display", "-title", "hello", "-geometry", "+40+40", "-size", "200x120", "xc:red"]
# (Xephyr loses what is drawn before its window is shown on the host: draw until the test
# has seen it)
DRAW = "while :; do xsetroot -solid {color}; sleep 0.2; done"
INSIDE = ("echo display=$DISPLAY; ls -A /tmp/.X11-unix; xdpyinfo | grep dimensions;"
          " xdpyinfo -display :{host} >/dev/null 2>&1 && echo HOST-REACHED;"
          " XAUTHORITY=/dev/null xdpyinfo >/dev/null 2>&1 && echo NO-COOKIE-NEEDED;"
          " xlsclients -l | grep -c hostsecret")


@real_display
def test_xephyr_shows_the_app_in_one_window_and_nothing_of_the_host(
        instances, display, host_secret, tmp_path):
    host_sockets = set(os.listdir("/tmp/.X11-unix"))
    # (a window that stays: the nested server resets when its last client leaves)
    instance = start(instances, display, tmp_path, '[gui]\nsize = "400x300"\n', WINDOW)
    window, where = display.wait_window("[bbl:app] app")
    inside = (where["X"] + where["WIDTH"] // 2, where["Y"] + where["HEIGHT"] // 2)
    assert wait_until(lambda: display.pixel(*inside) == RED)  # what the app drew
    assert display.pixel(1023, 767) != RED  # and nowhere else
    display.keep_screenshot("xephyr")
    lines = probe_inside(instances, instance, display)
    assert lines[0] == "display=:1" and lines[1] == "X1", lines
    assert "400x300 pixels" in lines[2]
    assert lines[3:] == ["0", ""]  # no host display, no way without the cookie, no host
    # window among the clients
    xephyr = xephyr_processes()
    assert len(xephyr) == 1
    argv = open(f"/proc/{xephyr[0]}/cmdline").read().split("\0")
    assert "-auth" in argv and "-ac" not in argv and "tcp" in argv  # (-nolisten tcp)
    # the nested display follows its window's size
    display.run("xdotool", "windowsize", str(window), "500", "350")
    assert wait_until(lambda: "500x350 pixels" in instances.ctl(
        "exec", instance, "--", "sh", "-c", "xdpyinfo | grep dimensions").stdout)
    assert instances.ctl("stop", instance).returncode == 0
    assert wait_gone(xephyr) == []
    assert_nothing_left(instances, host_sockets)


def assert_nothing_left(instances, host_sockets: set[str]) -> None:
    """No socket or cookie in BBL's runtime directory, none on the host's /tmp/.X11-unix."""
    assert sorted(os.listdir(os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl"))) == [
        "bbld.sock", "instances"]
    assert set(os.listdir("/tmp/.X11-unix")) == host_sockets


@real_display
@pytest.mark.parametrize("mode, end", [("xephyr", "kill"), ("xephyr", "kill layer 1"),
                                       ("xpra", "kill"), ("xpra", "kill layer 1")])
def test_no_nested_display_outlives_its_instance(instances, display, tmp_path, mode, end):
    if mode == "xpra" and not shutil.which("xpra"):
        pytest.skip("needs xpra (.ci/run installs it)")
    instance = start(instances, display, tmp_path, f'gui = "{mode}"\n', ["sleep", "600"])
    helpers = xephyr_processes if mode == "xephyr" else xpra_processes
    assert wait_until(lambda: len(helpers()) == (1 if mode == "xephyr" else 3), 30)
    xephyr = helpers()
    if end == "kill":
        assert instances.ctl("kill", "--signal", "KILL", instance).returncode == 0
    else:
        tree = json.loads(instances.ctl("tree", instance, "--json").stdout)
        os.kill(tree[0]["layers"][0]["pid"], signal.SIGKILL)
    assert wait_gone(xephyr) == []
    assert wait_until(lambda: instance not in instances.ctl("ps").stdout)


@real_display
def test_host_x11_the_control_reaches_the_hosts_windows(
        instances, display, host_secret, tmp_path):
    instance = start(instances, display, tmp_path, 'gui = "host-x11"\n', ["sleep", "600"])
    probes = instances.ctl("exec", instance, "--", "sh", "-c", "xlsclients -l | grep -c "
                           "hostsecret; xdpyinfo | grep -c dimensions")
    found, dimensions = probes.stdout.split()
    assert int(found) >= 1 and dimensions == "1", probes  # the probes do see a leak
    assert instances.ctl("stop", instance).returncode == 0


@real_display
def test_a_session_runs_beside_the_app_on_the_nested_display(instances, display, tmp_path):
    instance = start(instances, display, tmp_path,
                     '[gui]\nsize = "300x200"\nsession = ["sh", "-c", '
                     f'{json.dumps(DRAW.format(color="blue"))}]\n', ["sleep", "600"])
    title = "[bbl:app] app"
    _, where = display.wait_window(title)
    assert wait_until(lambda: display.pixel(where["X"] + 10, where["Y"] + 10) == BLUE)
    assert instances.ctl("stop", instance).returncode == 0


UNTRUSTED = ("xdpyinfo >/dev/null 2>&1 && echo connects;"
             " import -window root /tmp/screen.png >/dev/null 2>&1 && echo read-the-screen;"
             " xdpyinfo -queryExtensions | grep -c -E 'XTEST|XInputExtension';"
             " xdotool key a >/dev/null 2>&1 && echo typed")


@real_display
@pytest.mark.parametrize("mode, seen", [
    ("host-x11-untrusted", ["connects", "0"]),
    ("host-x11", ["connects", "read-the-screen", "2", "typed"]),  # (the control)
])
def test_an_untrusted_cookie_lets_the_app_draw_but_not_read_or_drive_the_host(
        instances, display, tmp_path, mode, seen):
    instance = start(instances, display, tmp_path, f'gui = "{mode}"\n', WINDOW)
    _, where = display.wait_window("hello")
    assert wait_until(lambda: display.pixel(where["X"] + 20, where["Y"] + 20) == RED)
    display.keep_screenshot(mode)
    probes = instances.ctl("exec", instance, "--", "sh", "-c", UNTRUSTED)
    assert probes.stdout.split() == seen, probes
    assert instances.ctl("stop", instance).returncode == 0


@real_display
def test_untrusted_is_refused_where_the_display_lets_the_user_in_without_a_cookie(
        instances, display, tmp_path):
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    assert display.run("xhost", f"+SI:localuser:{user}").returncode == 0  # (desktops do)
    path = write(tmp_path, 'command = ["true"]\ngui = "host-x11-untrusted"\n')
    instances.env.update(display.env)
    for argv in (("profile", "validate", path), ("start", path)):
        result = instances.ctl(*argv)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result
        assert f"{path}:2: gui: the host's display lets clients in without a cookie " \
               f"(SI:localuser:{user})" in result.stderr


# ---------------------------------------------------------------- Wayland

WAYLAND_PROGRAMS = ("weston", "weston-simple-shm", "weston-screenshooter", "convert")
real_wayland = pytest.mark.skipif(
    not all(shutil.which(p) for p in WAYLAND_PROGRAMS),
    reason="needs weston (with its clients) and imagemagick (.ci/run installs them)")


class Compositor:
    """A headless weston of the test's own (its screenshooter allowed: --debug)."""

    def __init__(self, tmp_path):
        self.directory = tmp_path / "wayland"
        self.directory.mkdir(mode=0o700)
        self.socket = self.directory / "wl-test"
        self.proc = subprocess.Popen(
            ["weston", "--backend=headless-backend.so", "--use-pixman", "--socket=wl-test",
             "--width=640", "--height=480", "--debug", "--idle-time=0"],
            env={**os.environ, "XDG_RUNTIME_DIR": str(self.directory)}, cwd=self.directory,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(self.socket.exists), "weston did not start"

    def colors(self) -> int:
        """How many colors a screenshot of the whole output has (1: the bare background)."""
        for old in self.directory.glob("wayland-screenshot*.png"):
            old.unlink()
        subprocess.run(["weston-screenshooter"], cwd=self.directory, timeout=TIMEOUT,
                       env={**os.environ, "XDG_RUNTIME_DIR": str(self.directory),
                            "WAYLAND_DISPLAY": "wl-test"}, capture_output=True)
        shots = list(self.directory.glob("wayland-screenshot*.png"))
        if not shots:
            return 0
        return int(subprocess.run(["convert", str(shots[0]), "-format", "%k", "info:"],
                                  capture_output=True, text=True, timeout=TIMEOUT).stdout)

    def keep_screenshot(self) -> None:
        """The last screenshot as docs/screenshots/gui-wayland.png (with BBL_SCREENSHOTS)."""
        directory = os.environ.get("BBL_SCREENSHOTS")
        if directory:
            shot = next(self.directory.glob("wayland-screenshot*.png"))
            shutil.copy(shot, os.path.join(directory, "gui-wayland.png"))

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=TIMEOUT)


@real_wayland
def test_wayland_gives_the_app_the_compositors_socket_alone(instances, tmp_path):
    compositor = Compositor(tmp_path)
    try:
        assert compositor.colors() == 1  # (the bare background)
        path = write(tmp_path, 'command = ["weston-simple-shm"]\ngui = "wayland"\n', "app.toml")
        instances.env.update({"WAYLAND_DISPLAY": str(compositor.socket)})
        started = instances.ctl("start", "--detach", path)
        assert started.returncode == 0, started.stderr
        instance = started.stdout.strip()
        assert wait_until(lambda: compositor.colors() > 100)  # the client's pixels
        compositor.keep_screenshot()
        probes = instances.ctl("exec", instance, "--", "sh", "-c",
                               'ls -A "$XDG_RUNTIME_DIR"; echo "$WAYLAND_DISPLAY ${DISPLAY:-no-X}";'
                               " ls /tmp/.X11-unix 2>/dev/null | wc -l")
        assert probes.stdout.split() == ["wayland-0", "wayland-0", "no-X", "0"], probes
        assert instances.ctl("stop", instance).returncode == 0
    finally:
        compositor.close()


def test_wayland_without_a_compositor_is_one_line(tmp_path):
    path = write(tmp_path, 'gui = "wayland"\n')
    with pytest.raises(profile.ProfileError) as caught:
        profile.load(path, {"HOME": "/home/u", "PATH": os.defpath})
    assert caught.value.problems == [
        f"{path}:1: gui: wayland binds the compositor's socket, and WAYLAND_DISPLAY (with "
        "XDG_RUNTIME_DIR) names none: start it from a Wayland session"]


# ---------------------------------------------------------------- xpra

XPRA_PROGRAMS = ("xpra", "xclip")
real_xpra = pytest.mark.skipif(
    not all(shutil.which(p) for p in X_PROGRAMS + XPRA_PROGRAMS),
    reason="needs xpra and xclip besides the X programs (.ci/run installs them)")


def user_processes() -> dict[int, list[str]]:
    """pid: argv of the test user's processes."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid == os.getuid():
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found[int(entry)] = f.read().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
    return found


def program(argv: list[str]) -> str:
    """What runs: the script for an interpreter (xpra is a Python script)."""
    if os.path.basename(argv[0]).startswith("python") and len(argv) > 1:
        return os.path.basename(argv[1])
    return os.path.basename(argv[0])


def xpra_processes() -> list[int]:
    return [pid for pid, argv in user_processes().items()
            if argv and (program(argv) == "xpra" or argv[0].startswith("Xvfb-for-Xpra"))]


def instance_programs(instances, instance) -> list[str]:
    """What runs in the instance (beside BBL's own: bbl-layer, bbl-init, python -I -m)."""
    tree = json.loads(instances.ctl("tree", instance, "--json").stdout)
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    inside, found = {tree[0]["layers"][0]["pid"]}, True
    while found:
        found = {pid for pid, parent in parents.items() if parent in inside} - inside
        inside |= found
    processes = user_processes()
    names = [program(processes[pid]) for pid in inside if processes.get(pid)]
    return sorted(n for n in names if not n.startswith("bbl-") and n != "-I")


def stays_false(condition, seconds: float = 3) -> bool:
    """condition() never true for `seconds` (what must not happen has had its chance)."""
    return not wait_until(condition, seconds)


@real_xpra
def test_xpra_shows_each_window_on_the_host_and_nothing_of_the_host(
        instances, display, host_secret, tmp_path):
    host_sockets = set(os.listdir("/tmp/.X11-unix"))
    instance = start(instances, display, tmp_path, 'gui = "xpra"\n', WINDOW)
    # (the instance's name, then the app's own title)
    _, where = display.wait_window("[bbl:app] hello")
    assert (where["WIDTH"], where["HEIGHT"]) == (200, 120)  # the app's window alone
    assert wait_until(lambda: display.pixel(where["X"] + 20, where["Y"] + 20) == RED)
    assert display.pixel(1023, 767) != RED  # and nowhere else
    display.keep_screenshot("xpra")
    lines = probe_inside(instances, instance, display)
    assert lines[0] == "display=:1" and lines[1] == "X1", lines
    assert "1024x768 pixels" in lines[2]  # (the server's display follows the host's)
    assert lines[3:] == ["0", ""]  # no host display, no way without the cookie, no host
    # window among the clients
    # the server starts nothing but the app: no X session, D-Bus, at-spi or ssh-agent
    assert instance_programs(instances, instance) == [
        "Xvfb-for-Xpra-:1", "display", "xpra", "xpra"]
    server = next(user_processes()[pid] for pid in xpra_processes()
                  if "Xvfb" in user_processes()[pid][0])
    assert "-auth" in server and "-ac" not in server
    assert instances.ctl("stop", instance).returncode == 0
    assert wait_until(lambda: xpra_processes() == [])
    assert_nothing_left(instances, host_sockets)


def clipboard(instances, instance) -> str:
    return instances.ctl("exec", instance, "--", "xclip", "-o", "-selection",
                         "clipboard").stdout


@real_xpra
@pytest.mark.parametrize("policy, inward, outward", [
    ("none", False, False), ("to-sandbox", True, False), ("from-sandbox", False, True),
    ("both", True, True)])
def test_xpra_carries_the_clipboard_only_the_way_the_policy_says(
        instances, display, tmp_path, policy, inward, outward):
    host = subprocess.Popen(["xclip", "-quiet", "-selection", "clipboard", "-i"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **display.env})
    host.stdin.write(b"from-host")
    host.stdin.close()
    try:
        instance = start(instances, display, tmp_path,
                         f'[gui]\nmode = "xpra"\nclipboard = "{policy}"\n', WINDOW)
        display.wait_window("[bbl:app] hello")
        if inward:
            assert wait_until(lambda: clipboard(instances, instance) == "from-host")
        else:
            assert stays_false(lambda: clipboard(instances, instance) == "from-host")
        assert instances.ctl("exec", instance, "--", "sh", "-c", "printf from-sandbox | xclip "
                             "-selection clipboard -i >/dev/null 2>&1").returncode == 0

        def host_has():
            return display.run("xclip", "-o", "-selection", "clipboard").stdout
        if outward:
            assert wait_until(lambda: host_has() == "from-sandbox")
        else:
            assert stays_false(lambda: host_has() == "from-sandbox")
        assert instances.ctl("stop", instance).returncode == 0
    finally:
        host.kill()
        host.wait()


def layer_named(layer: dict, name: str) -> dict | None:
    if layer["name"] == name:
        return layer
    return next(filter(None, (layer_named(child, name) for child in layer.get("layers", []))),
                None)


@real_xpra
@pytest.mark.parametrize("policy", ["none", "to-sandbox"])
def test_the_trusted_client_keeps_the_policy_against_a_server_that_does_not(
        instances, display, tmp_path, policy):
    """The app's side is not trusted: an xpra server it took over offers the clipboard both
    ways, and the client (layer2x) still carries nothing out."""
    path = write(tmp_path, f'command = {json.dumps(WINDOW)}\n[gui]\nmode = "xpra"\n'
                 f'clipboard = "{policy}"\n', "app.toml")
    instances.env.update(display.env)
    tree = json.loads(msgspec.json.encode(profile.load(path, instances.env)))
    server = layer_named(tree["layer"], "layer4x")["companions"][0]
    server["argv"] = [a for a in server["argv"] if not a.startswith("--clipboard")] + [
        "--clipboard=yes", "--clipboard-direction=both"]
    instance = instances.start(tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    display.wait_window("[bbl:app] hello")
    assert instances.ctl("exec", instance, "--", "sh", "-c", "printf from-sandbox | xclip "
                         "-selection clipboard -i >/dev/null 2>&1").returncode == 0
    assert stays_false(lambda: display.run("xclip", "-o", "-selection", "clipboard").stdout
                       == "from-sandbox")


@real_xpra
def test_a_terminal_app_gets_its_terminal_under_xpra(instances, display, tmp_path):
    """xterm chowns its pty to the tty group, which the sandbox does not map: the layer's own
    devpts gives it the user's group, and it starts."""
    instance = start(instances, display, tmp_path, 'gui = "xpra"\n', [
        "xterm", "-T", "term", "-e", "sh", "-c", "tty > /tmp/tty; exec sleep 600"])
    display.wait_window("[bbl:app] term")
    assert wait_until(lambda: instances.ctl("exec", instance, "--", "cat", "/tmp/tty")
                      .stdout.startswith("/dev/pts/"))
    assert instances.ctl("stop", instance).returncode == 0


# ---------------------------------------------------------------- Wayland security contexts

# a Wayland client in a few lines: the globals its compositor lists it (a round trip)
GLOBALS = r'''
import os, socket, struct
s = socket.socket(socket.AF_UNIX)
s.connect(os.path.join(os.environ["XDG_RUNTIME_DIR"], os.environ["WAYLAND_DISPLAY"]))
s.sendall(struct.pack("=III", 1, 12 << 16 | 1, 2) + struct.pack("=III", 1, 12 << 16, 3))
data, found = b"", []
while True:
    data += s.recv(4096)
    while len(data) >= 8 and len(data) >= struct.unpack_from("=I", data, 4)[0] >> 16:
        obj, word = struct.unpack_from("=II", data)
        body, data = data[8:word >> 16], data[word >> 16:]
        if obj == 3:
            print(" ".join(found))
            raise SystemExit
        n = struct.unpack_from("=I", body, 4)[0]
        found.append(body[8:8 + n - 1].decode())
'''


@pytest.mark.parametrize("offers", [True, False])
def test_wayland_gives_a_socket_the_compositor_knows_as_the_sandboxs(
        instances, tmp_path, offers):
    """Where the compositor offers wp_security_context_manager_v1, the app's wayland-0 is a
    socket of the instance's own that the compositor tags (engine, app id, instance id) and
    stops serving when the instance ends; elsewhere the compositor's socket, with a notice."""
    from tests.fake_compositor import FakeCompositor

    directory = tmp_path / "wl"
    directory.mkdir(mode=0o700)
    compositor = FakeCompositor(str(directory / "wl-fake"), offers_contexts=offers)
    try:
        path = write(tmp_path, f'command = ["python3", "-c", {json.dumps(GLOBALS)}]\n'
                     'gui = "wayland"\napp_id = "org.example.App"\n', "app.toml")
        instances.env.update({"WAYLAND_DISPLAY": str(directory / "wl-fake")})
        result = instances.ctl("start", path)
        assert result.returncode == 0, result.stderr
        if offers:
            assert result.stdout.split() == ["wl_compositor"]  # (no nested contexts)
            assert result.stderr == ""
            [context] = compositor.contexts
            assert context["committed"] and context["engine"] == "io.bbl"
            assert context["app_id"] == "org.example.App"
            ended = json.loads(instances.ctl("ps", "--all", "--json").stdout)
            assert context["instance_id"] == ended[-1]["id"]
            # (the app's, and the start's own check that the socket accepts)
            assert compositor.clients["sandboxed"] == 2
            assert compositor.closed.wait(TIMEOUT)  # the instance ended: no more clients
        else:
            assert result.stdout.split() == ["wl_compositor"]
            assert result.stderr == (
                f"bblctl: notice: {path}:2: gui: the compositor offers no security context "
                "(wp_security_context_manager_v1): the app gets its own socket, with every "
                "client's rights\n")
            assert compositor.contexts == [] and compositor.clients["sandboxed"] == 0
        assert sorted(os.listdir(os.path.join(instances.env["XDG_RUNTIME_DIR"], "bbl"))) == [
            "bbld.sock", "instances"]  # (the socket went with the instance)
    finally:
        compositor.close()
