"""A layer's pids limit: a cgroup of its own under $BBL_CGROUP that counts every process of
the layer and of the layers below it, and that nothing inside can raise or leave."""

import json
import os

from tests.conftest import app_layer, layer, py, run_sandbox, sandbox

BOMB = ("import os, time\ncount = 0\nfor _ in range(300):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        os.closerange(0, 3)\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n    count += 1\nprint(count)\n")


def test_the_untrusted_zone_of_a_profile_has_one_pids_limit(pids_cgroup, instances, tmp_path):
    instances.env["BBL_CGROUP"] = pids_cgroup
    path = tmp_path / "bomb.toml"
    path.write_text(f'limits = {{ pids = 30 }}\ncommand = {json.dumps(["python3", "-c", BOMB])}\n')
    result = instances.ctl("start", str(path), stdin=open(os.devnull))
    assert result.returncode == 0, result.stderr
    assert 0 < int(result.stdout) < 30


def test_exec_counts_in_the_layers_limit(pids_cgroup, instances, tmp_path):
    instances.env["BBL_CGROUP"] = pids_cgroup
    path = tmp_path / "idle.toml"
    path.write_text('limits = { pids = 12 }\ncommand = ["sleep", "600"]\n')
    instance = instances.ctl("start", str(path), "--detach").stdout.strip()
    instances.ids.append(instance)
    result = instances.ctl("exec", instance, "--", "python3", "-c", BOMB)
    assert result.returncode == 0, result.stderr
    assert 0 < int(result.stdout) < 12


def test_an_outer_limit_counts_the_layers_below(tmp_path, pids_cgroup):
    inner = app_layer("inner", command=py(BOMB), pids_limit=100)
    outer = layer("outer", namespaces=["user", "mount", "pid"], uid=0, gid=0, pids_limit=15,
                  layers=[inner])
    result = run_sandbox(tmp_path, sandbox(outer), env={**os.environ, "BBL_CGROUP": pids_cgroup})
    assert result.returncode == 0, result.stderr
    assert 0 < int(result.stdout) < 15


ESCAPE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNS | os.CLONE_NEWCGROUP) \\
    if hasattr(os, "unshare") else libc.unshare(0x10000000 | 0x20000 | 0x2000000)
open("/proc/self/uid_map", "w").write(f"0 {uid} 1")
open("/proc/self/setgroups", "w").write("deny")
open("/proc/self/gid_map", "w").write(f"0 {gid} 1")
assert libc.mount(b"none", b"/tmp", b"cgroup2", 0, None) == 0, os.strerror(ctypes.get_errno())
raised = []
for top, dirs, files in os.walk("/tmp"):
    for name in files:
        if name in ("pids.max", "cgroup.procs", "cgroup.subtree_control"):
            try:
                with open(os.path.join(top, name), "w") as f:
                    f.write({"pids.max": "max", "cgroup.procs": "0"}.get(name, "-pids"))
                raised.append(os.path.join(top, name))
            except OSError:
                pass
print(sorted(os.listdir("/tmp")), raised)
""" + BOMB


def test_a_layer_that_mounts_its_cgroups_cannot_raise_or_leave_its_limit(tmp_path, pids_cgroup):
    """The layer's cgroup namespace is rooted at its own leaf (CLONE_NEWCGROUP together with
    CLONE_INTO_CGROUP), so even with a user namespace of its own and cgroup2 mounted, the
    cgroup holding its pids.max is above what it can see."""
    app = app_layer(command=py(ESCAPE), pids_limit=15, namespaces=["user", "mount", "pid",
                                                                   "cgroup"],
                    fs=[*app_layer()["fs"], {"op": "tmpfs", "dest": "/tmp"}])
    result = run_sandbox(tmp_path, sandbox(app), env={**os.environ, "BBL_CGROUP": pids_cgroup})
    assert result.returncode == 0, result.stderr
    seen, count = result.stdout.splitlines()
    assert "pids.max" not in seen  # the limit's own cgroup is out of sight
    assert 0 < int(count) < 15


def test_a_pids_limit_without_a_delegated_cgroup_is_a_clear_error(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "BBL_CGROUP"}
    result = run_sandbox(tmp_path, sandbox(app_layer(command=["true"], pids_limit=5)), env=env)
    assert result.returncode == 2
    assert "layer 'app': pids_limit needs a delegated cgroup: set BBL_CGROUP" in result.stderr


def test_a_bbl_cgroup_that_is_no_cgroup_is_a_clear_error_and_leaves_nothing(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    result = run_sandbox(tmp_path, sandbox(app_layer(command=["true"], pids_limit=5)),
                         env={**os.environ, "BBL_CGROUP": str(plain)})
    assert result.returncode == 2
    assert f"BBL_CGROUP={plain}: " in result.stderr and "cgroup v2 directory" in result.stderr
    assert os.listdir(plain) == []
