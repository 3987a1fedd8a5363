"""Root can use the engine too (the suite's second pass, run as root)."""

import os
import shutil
import subprocess

import pytest

from tests.conftest import app_layer, layer, run_sandbox, sandbox, sh, start_sandbox

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.getuid() != 0, reason="needs to run as root")]


def test_root_runs_a_nested_sandbox(tmp_path):
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], uid=1000, gid=1000,
                 command=sh("id -u; cat /proc/self/uid_map; grep CapBnd /proc/self/status"))
    result = run_sandbox(tmp_path, sandbox(app_layer("top", layers=[leaf])))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000", "1000", "0", "1", "CapBnd:", "0000000000000000"]


def test_root_without_a_user_namespace_still_drops_everything(tmp_path):
    spec = sandbox(layer("real", namespaces=["mount", "pid"], new_root=True,
                         fs=app_layer()["fs"], command=sh("id -u; grep -E 'Cap(Eff|Bnd)' "
                                                          "/proc/self/status")))
    result = run_sandbox(tmp_path, spec)
    assert result.stdout.split() == ["0", "CapEff:", "0000000000000000", "CapBnd:",
                                     "0000000000000000"], result.stderr


@pytest.mark.parametrize("uid", [0, 1000])
def test_root_may_map_a_range_of_ids(tmp_path, uid):
    spec = sandbox(app_layer(uid=uid, gid=uid,
                             uid_map=[{"inside": 0, "outside": 100000, "count": 65536}],
                             gid_map=[{"inside": 0, "outside": 100000, "count": 65536}],
                             command=sh("cat /proc/self/uid_map; id -u; id -g; ls /")))
    result = run_sandbox(tmp_path, spec)
    assert result.stdout.split()[:5] == ["0", "100000", "65536", str(uid), str(uid)], \
        result.stderr
    assert "usr" in result.stdout.split()


def test_supervisors_hold_no_fd_of_the_caller(tmp_path):
    leaked = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        leaf = layer("leaf", namespaces=["user", "mount", "pid"], command=["sleep", "30"])
        running = start_sandbox(tmp_path, sandbox(app_layer("top", layers=[leaf])),
                                pass_fds=(leaked,))
        try:
            host_root = os.fstat(leaked)
            for entry in running.info:
                fds = os.listdir(f"/proc/{entry['pid']}/fd")
                inodes = [(st.st_dev, st.st_ino) for st in
                          (os.stat(f"/proc/{entry['pid']}/fd/{fd}") for fd in fds)]
                assert (host_root.st_dev, host_root.st_ino) not in inodes, entry["layer"]
                assert len(fds) <= 7, (entry["layer"], fds)
        finally:
            running.proc.terminate()
            assert running.finish().returncode == 143
    finally:
        os.close(leaked)


def test_root_runs_and_enters_instances_through_the_daemon(instances):
    import json

    result = instances.ctl("run", "--ro-bind", "/", "/", "--unshare-pid", "sh", "-c",
                           "id -u; exit 3")
    assert (result.returncode, result.stdout) == (3, "0\n"), result.stderr
    instance = instances.start(sandbox(app_layer(command=["sleep", "600"])))
    entered = instances.ctl("exec", instance, "--", "sh", "-c",
                            "id -u; grep CapEff /proc/self/status")
    assert entered.stdout.split() == ["0", "CapEff:", "0000000000000000"], entered.stderr
    assert [e["id"] for e in json.loads(instances.ctl("ps", "--json").stdout)] == [instance]
    assert instances.ctl("stop", instance).returncode == 0


CAPS = "grep -E '^Cap(Inh|Prm|Eff|Amb):' /proc/self/status"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="Debian's bubblewrap is missing")
@pytest.mark.parametrize("options", [
    ["--unshare-pid"],  # root keeps its capabilities, none of them ambient or inheritable
    ["--unshare-user", "--uid", "1000"],  # a uid change loses them all at execve
    ["--unshare-user", "--uid", "1000", "--cap-add", "CAP_NET_ADMIN"],  # unless asked for
    ["--unshare-pid", "--cap-drop", "CAP_SYS_ADMIN"],  # a cap option makes them ambient
], ids=" ".join)
def test_root_has_the_capabilities_bubblewrap_gives_root(instances, options):
    argv = ["--bind", "/", "/", *options, "sh", "-c", CAPS]
    ours = instances.ctl("run", *argv)
    theirs = subprocess.run([shutil.which("bwrap"), *argv], capture_output=True, text=True,
                            timeout=60)
    assert theirs.returncode == 0, theirs.stderr
    assert (ours.returncode, ours.stdout) == (0, theirs.stdout), ours.stderr


def _nat_processes() -> set[int]:
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                name, rest = f.read().split("(", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        if name.startswith(("passt", "pasta")) and rest.split()[0] != "Z":
            found.add(int(entry))
    return found


@pytest.mark.skipif(shutil.which("pasta") is None or not os.path.exists("/dev/net/tun"),
                    reason="needs pasta (passt) and /dev/net/tun")
def test_root_gets_a_nat_that_ends_with_the_instance(instances, tmp_path):
    """As root pasta keeps root's ids (it would switch to nobody, clearing its parent-death
    signal); only the sandbox's own loopback is contacted."""
    before = _nat_processes()
    path = tmp_path / "nat.toml"
    path.write_text('command = ["sh", "-c", "cut -d: -f1 /proc/net/dev | tail -n +3"]\n'
                    'net = "nat"\n')
    result = instances.ctl("start", str(path))
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["eth0", "lo"]
    assert _nat_processes() - before == set()
