"""Where bbld lives: one place per user whatever the environment says, one daemon per place,
instances that stay visible, a history that survives restarts, and a daemon one can ask."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bbld import paths
from tests.conftest import BBLD, TIMEOUT, daemon_pid, processes_with, wait_for_socket, wait_gone

BBLCTL = [sys.executable, "-m", "bblctl"]
ENDS_WITH_4 = 'trap "exit 4" TERM; while :; do sleep 0.05; done'


def ctl(env, *argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([*BBLCTL, *argv], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, **kw)


@pytest.fixture
def places(tmp_path):
    """places(NAME): the environment of a place of its own in tmp_path (a runtime and a
    state directory); the daemon each one has at the end is ended by pid."""
    made = []

    def place(name: str) -> dict:
        run = tmp_path / name
        run.mkdir(mode=0o700)
        made.append({**os.environ, "XDG_RUNTIME_DIR": str(run),
                     "XDG_STATE_HOME": str(tmp_path / f"{name}-state")})
        return made[-1]

    yield place
    pids = [pid for pid in map(daemon_pid, made) if pid]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    assert wait_gone(pids) == []


def detached(env, tmp_path: Path, script: str) -> str:
    profile = tmp_path / f"p{len(os.listdir(tmp_path))}.toml"
    profile.write_text(f"command = {json.dumps(['sh', '-c', script])}\n")
    started = ctl(env, "start", str(profile), "--detach")
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


def listed(env, every: bool = False) -> dict:
    out = ctl(env, "ps", "--json", *(["--all"] if every else [])).stdout
    return {entry["id"]: entry for entry in json.loads(out)}


def test_without_xdg_runtime_dir_the_logind_directory_is_the_place(tmp_path, monkeypatch):
    logind = tmp_path / "user" / str(os.getuid())
    logind.mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(paths, "LOGIND_RUNTIME", str(tmp_path / "user" / "{uid}"))
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert paths.runtime_dir() == str(logind / "bbl")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(logind))  # what logind sets: the same place
    assert paths.runtime_dir() == str(logind / "bbl")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    os.chmod(logind, 0o755)  # not the user's alone: the home's fallback
    assert paths.runtime_dir() == os.path.join(os.environ["HOME"], ".local", "state", "bbl",
                                               "run")


def test_a_socket_activated_bbld_takes_its_place_from_the_socket(places, tmp_path):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    served = places("served")
    instance = detached(served, tmp_path, "sleep 600")
    directory = Path(served["XDG_RUNTIME_DIR"]) / "bbl"
    before = sorted(os.listdir(directory / "instances"))
    elsewhere = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    try:
        # A second bbld handed a socket in the same directory refuses, touching nothing.
        second = subprocess.Popen([activate, "-l", str(directory / "other.sock"), *BBLD],
                                  env=elsewhere, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT
        while not (directory / "other.sock").exists():
            assert time.monotonic() < deadline and second.poll() is None
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as knock:  # (a connection starts it)
            knock.connect(str(directory / "other.sock"))
            assert second.wait(timeout=TIMEOUT) != 0
        assert f"already serves {directory}" in second.stderr.read()
        # One handed a socket elsewhere serves that directory, whatever its environment.
        other = tmp_path / "other" / "bbl"
        other.mkdir(parents=True, mode=0o700)
        proc = subprocess.Popen([activate, "-l", str(other / "bbld.sock"), *BBLD],
                                env=elsewhere, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_socket(other / "bbld.sock", proc)
            status = ctl({**elsewhere, "XDG_RUNTIME_DIR": str(other.parent)}, "daemon",
                         "status", "--json")
            facts = json.loads(status.stdout)
            assert (facts["runtime"], facts["started_by"]) == (str(other),
                                                               "socket activation")
            assert sorted(os.listdir(other)) == ["bbld.sock", "instances"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=TIMEOUT)
        assert sorted(os.listdir(directory / "instances")) == before
        assert list(listed(served)) == [instance]
    finally:
        ctl(served, "stop", instance, "--timeout", "0")


@pytest.mark.parametrize("killed", ["first", "second"])
def test_two_daemons_for_two_places_never_touch_each_other(places, tmp_path, killed):
    envs = [places("first"), places("second")]
    ids = []
    try:
        for env in envs:
            ids.append(detached(env, tmp_path, ENDS_WITH_4))
        gone, kept = (0, 1) if killed == "first" else (1, 0)
        pid = daemon_pid(envs[gone])
        os.kill(pid, signal.SIGKILL)
        assert wait_gone([pid]) == []
        assert list(listed(envs[kept])) == [ids[kept]]
        exec_ = ctl(envs[kept], "exec", ids[kept], "--", "sh", "-c", "exit 5")
        assert exec_.returncode == 5, exec_.stderr
        attached = ctl(envs[kept], "attach", ids[kept], "--", "sh", "-c", "tty; exit 6")
        assert attached.returncode == 6 and attached.stdout.startswith("/dev/pts/")
        assert ctl(envs[kept], "stop", ids[kept]).returncode == 0
        assert listed(envs[kept], every=True)[ids[kept]]["status"] == 4
        assert list(listed(envs[gone])) == [ids[gone]]  # a new bbld adopts the other's
    finally:  # (what started, even if the rest did not)
        for env, instance in zip(envs, ids, strict=False):
            ctl(env, "stop", instance, "--timeout", "0")
        for env in envs:
            ctl(env, "daemon", "stop")


def test_an_instance_stays_visible_when_its_directory_goes(places, tmp_path, marker):
    env = places("run")
    assert ctl(env, "ps").returncode == 0
    instances = Path(env["XDG_RUNTIME_DIR"]) / "bbl" / "instances"
    os.rmdir(instances)
    profile = tmp_path / "exit4.toml"
    profile.write_text(f"command = {json.dumps(['sh', '-c', 'exit 4', marker])}\n")
    assert ctl(env, "start", str(profile)).returncode == 4
    instance = detached(env, tmp_path, f"sleep 600 # {marker}")
    try:
        assert list(listed(env)) == [instance]
        assert instances.is_dir()
    finally:
        ctl(env, "stop", instance, "--timeout", "0")
    assert wait_gone(processes_with(marker)) == []


def test_ended_instances_are_remembered_across_restarts(places, tmp_path):
    env = places("run")
    profile = tmp_path / "exit3.toml"
    profile.write_text('command = ["sh", "-c", "exit 3"]\n')
    assert ctl(env, "start", str(profile)).returncode == 3
    (ended,) = listed(env, every=True).values()
    assert ctl(env, "daemon", "stop").returncode == 0
    (again,) = listed(env, every=True).values()  # a new bbld
    assert (again["id"], again["status"]) == (ended["id"], 3)
    history = Path(env["XDG_STATE_HOME"]) / "bbl" / "history.jsonl"
    assert stat_mode(history) == 0o600
    ctl(env, "daemon", "stop")


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_the_daemon_says_what_it_is_and_stops_leaving_its_instances(places, tmp_path):
    env = places("run")
    none = ctl(env, "daemon", "status")
    assert none.returncode == 3 and none.stdout.startswith("bbld: not running")
    instance = detached(env, tmp_path, "sleep 600")
    try:
        facts = json.loads(ctl(env, "daemon", "status", "--json").stdout)
        runtime = str(Path(env["XDG_RUNTIME_DIR"]) / "bbl")
        assert facts["running"] and facts["instances"] == 1
        assert (facts["runtime"], facts["socket"], facts["started_by"]) == (
            runtime, f"{runtime}/bbld.sock", "autostart")
        text = ctl(env, "daemon", "status").stdout
        assert f"pid        {facts['pid']}\n" in text
        stopped = ctl(env, "daemon", "stop")
        assert stopped.stdout == (f"bbld (pid {facts['pid']}) stopped; its 1 instance run on "
                                  "and the next bbld adopts them\n")
        assert wait_gone([facts["pid"]], timeout=1) == []
        assert list(listed(env)) == [instance]  # a new bbld
        version = ctl(env, "--version")
        assert version.stdout == f"bblctl {facts['version']}\n"
        assert subprocess.run([*BBLD, "--version"], capture_output=True, text=True,
                              timeout=TIMEOUT).stdout == f"bbld {facts['version']}\n"
    finally:
        ctl(env, "stop", instance, "--timeout", "0")
        ctl(env, "daemon", "stop")


@pytest.mark.root
@pytest.mark.skipif(os.getuid() != 0, reason="making /run/user/UID takes root")
def test_su_and_cron_sessions_reach_the_logind_sessions_daemon():
    """Without XDG_RUNTIME_DIR (su -, cron), the user reaches the daemon of their login
    session in /run/user/UID."""
    user = os.environ.get("BBL_TEST_USER", "bbltest")
    uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)
    logind = Path(f"/run/user/{uid}")
    made = next((p for p in (logind.parent, logind) if not p.exists()), None)
    if made:
        logind.mkdir(parents=True, mode=0o700)
        shutil.chown(logind, user, user)
    home = Path(tempfile.mkdtemp(prefix="bbl-home-"))
    shutil.chown(home, user, user)
    base = ["runuser", "-u", user, "--", "env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin",
            f"PYTHONPATH={os.pathsep.join(sys.path)}"]
    try:
        with_session = subprocess.run([*base, f"XDG_RUNTIME_DIR={logind}", *BBLCTL, "daemon",
                                       "status", "--json"], capture_output=True, text=True,
                                      timeout=TIMEOUT)
        ctl_ = subprocess.run([*base, *BBLCTL, "ps"], capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert ctl_.returncode == 0, ctl_.stderr
        without = json.loads(subprocess.run([*base, *BBLCTL, "daemon", "status", "--json"],
                                            capture_output=True, text=True,
                                            timeout=TIMEOUT).stdout)
        assert with_session.returncode == 3
        assert without["runtime"] == f"{logind}/bbl" and without["running"]
        subprocess.run([*base, *BBLCTL, "daemon", "stop"], capture_output=True, timeout=TIMEOUT)
    finally:
        shutil.rmtree(home)
        if made:
            shutil.rmtree(made)
        else:
            shutil.rmtree(logind / "bbl", ignore_errors=True)


def test_doctor_says_what_works_and_how_to_fix_what_does_not(places, tmp_path):
    env = places("run")
    healthy = ctl(env, "doctor", "--json")
    assert healthy.returncode == 0, healthy.stdout
    checks = {check["what"]: check for check in json.loads(healthy.stdout)}
    assert checks["user namespaces"]["level"] == "ok"
    assert checks["bbld"]["level"] == "ok" and "autostart" in checks["bbld"]["detail"]
    text = ctl(env, "doctor").stdout.splitlines()
    assert all(line.split()[0] in ("ok", "warn", "FAIL", "info") for line in text)
    units = Path(env["XDG_CONFIG_HOME"]) / "systemd" / "user"
    units.mkdir(parents=True)
    (units / "bbld.service").write_text("[Service]\nExecStart=/nonexistent/bbld\n")
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    broken = ctl({**env, "XDG_RUNTIME_DIR": str(loose)}, "doctor")
    assert broken.returncode == 1
    assert f"FAIL  runtime directory: {loose}/bbl: {loose} on its way may be written by " \
        "anyone" in broken.stdout, broken.stdout
    assert "FAIL  systemd units: " in broken.stdout and "bblctl setup" in broken.stdout
    ctl(env, "daemon", "stop")
