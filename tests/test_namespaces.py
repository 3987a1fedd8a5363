"""Namespaces and identities: every kind is new, ids map through the layers, deep nesting."""

import os

import pytest

from tests.conftest import app_layer, layer, py, run_sandbox, sandbox, sh, system_ops

KINDS = {"user": "user", "mount": "mnt", "pid": "pid", "ipc": "ipc", "uts": "uts",
         "net": "net", "cgroup": "cgroup", "time": "time"}


def host_ns(link: str) -> str:
    return os.readlink(f"/proc/self/ns/{link}")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_namespace_kind_is_new(tmp_path, kind):
    namespaces = sorted({"user", "mount", "pid", kind})
    spec = sandbox(app_layer(namespaces=namespaces, command=sh(
        f"readlink /proc/self/ns/{KINDS[kind]}")))
    result = run_sandbox(tmp_path, spec)
    assert result.returncode == 0, result.stderr
    inside = result.stdout.strip()
    assert inside.startswith(f"{KINDS[kind]}:[") and inside != host_ns(KINDS[kind])


def test_shared_namespaces_stay_the_host_ones(tmp_path):
    spec = sandbox(app_layer(command=sh("readlink /proc/self/ns/net /proc/self/ns/ipc")))
    result = run_sandbox(tmp_path, spec)
    assert result.stdout.split() == [host_ns("net"), host_ns("ipc")]


def test_hostname_and_loopback(tmp_path):
    script = ("import socket; print(socket.gethostname());"
              "s = socket.create_server(('127.0.0.1', 0)); c = socket.create_connection("
              "s.getsockname()); print('loopback-ok');"
              "print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev')"
              ".readlines()[2:]))")
    spec = sandbox(app_layer(namespaces=["user", "mount", "pid", "uts", "net"],
                             hostname="boxed", command=py(script)))
    result = run_sandbox(tmp_path, spec)
    assert result.stdout.splitlines() == ["boxed", "loopback-ok", "['lo']"], result.stderr


def three_levels(main: str) -> dict:
    """uid 0 in level1, 100 in level2, the user's own uid in the leaf."""
    script = sh("echo $(id -u) $(id -g); cat /proc/self/uid_map /proc/self/gid_map")
    me = os.getuid()
    leaf = layer("level3", namespaces=["user", "mount", "pid"], uid=me, gid=me,
                 command=script if main == "level3" else None)
    middle = layer("level2", namespaces=["user", "mount", "pid"], uid=100, gid=100,
                   layers=[leaf], command=script if main == "level2" else None)
    top = app_layer("level1", layers=[middle], command=script if main == "level1" else None)
    return sandbox(top, main=main)


@pytest.mark.parametrize("main, ids, parent_id", [
    ("level1", "0 0", os.getuid()), ("level2", "100 100", 0), ("level3", None, 100)])
def test_uid_and_gid_maps_through_three_levels(tmp_path, main, ids, parent_id):
    result = run_sandbox(tmp_path, three_levels(main))
    assert result.returncode == 0, result.stderr
    first, uid_map, gid_map = result.stdout.splitlines()
    me = os.getuid()
    inside = 0 if main == "level1" else 100 if main == "level2" else me
    assert first == (ids or f"{me} {me}")
    assert uid_map.split() == [str(inside), str(parent_id), "1"]
    assert gid_map.split()[:2] == [str(inside), str(parent_id if main != "level1"
                                                     else os.getgid())]


def test_eight_deep_tree_each_layer_with_its_own_namespaces_and_hostname(tmp_path):
    depth = 8
    leaf = None
    for level in range(depth, 0, -1):
        keys = dict(namespaces=["user", "mount", "pid", "uts"], uid=0, gid=0,
                    hostname=f"h{level}", layers=[leaf] if leaf else [])
        if level == depth:
            keys["command"] = sh("hostname; id -u; readlink /proc/self/ns/user")
        if level == 1:
            leaf = app_layer("l1", **keys)
        else:
            leaf = layer(f"l{level}", **keys)
    result = run_sandbox(tmp_path, sandbox(leaf))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["h8", "0"]
    assert [entry["layer"] for entry in result.info] == [f"l{i}" for i in range(1, 9)]
    for kind in ("user", "pid", "mnt", "uts"):
        ids = {entry["namespaces"][kind] for entry in result.info}
        assert len(ids) == depth, kind
    pids = [entry["pid"] for entry in result.info]
    assert len(set(pids)) == depth and all(pid > 1 for pid in pids)


def test_layer_without_namespaces_shares_its_parents(tmp_path):
    outer = app_layer("outer", layers=[layer("plain", command=sh("hostname"))],
                      namespaces=["user", "mount", "pid", "uts"], hostname="outerhost")
    result = run_sandbox(tmp_path, sandbox(outer))
    assert result.stdout == "outerhost\n"
    outer_ns, plain_ns = result.layer("outer")["namespaces"], result.layer("plain")["namespaces"]
    assert outer_ns == plain_ns


def test_environment_clear_set_unset_and_cwd(tmp_path):
    script = sh("echo $KEEP/$GONE/$NEW/$PWD; pwd")
    inner = layer("inner", env={"unset": ["GONE"], "set": {"NEW": "n"}}, cwd="/usr",
                  command=script)
    outer = app_layer("outer", env={"clear": True, "set": {"KEEP": "k", "GONE": "g",
                                                          "PATH": "/usr/bin:/bin"}},
                      layers=[inner])
    result = run_sandbox(tmp_path, sandbox(outer))
    assert result.stdout.splitlines() == ["k//n//usr", "/usr"], result.stderr


def test_default_cwd_is_the_callers_when_visible(tmp_path):
    visible = sandbox(app_layer(command=["pwd"], fs=system_ops() + [
        {"op": "bind", "src": str(tmp_path), "dest": str(tmp_path)}]))
    assert run_sandbox(tmp_path, visible, cwd=tmp_path).stdout == f"{tmp_path}\n"
    hidden = sandbox(app_layer(command=["pwd"], env={"set": {"HOME": "/tmp"}}))
    assert run_sandbox(tmp_path, hidden, cwd=tmp_path).stdout == "/tmp\n"


def test_the_namespace_table_has_a_row_for_every_namespace_a_spec_may_name():
    from bbld import spec
    from bbld.engine import namespaces

    assert sorted(name for name, _, _ in namespaces.TABLE) == sorted(spec.NAMESPACES)
