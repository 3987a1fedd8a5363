"""The spec: decoding, validation messages, and the CLI's handling of bad specs (no kernel)."""

import json

import pytest

from bbld import spec
from tests.conftest import app_layer, run_engine, sandbox, write_spec

TOML = """
name = "demo"
main = "leaf"

[layer]
name = "outer"
namespaces = ["user", "mount", "pid"]
uid = 0
gid = 0

[[layer.layers]]
name = "leaf"
namespaces = ["user", "mount", "pid", "uts"]
hostname = "leafhost"
command = ["sh", "-c", "true"]
companions = [{ argv = ["sleep", "1"], stdin = "null" }]
fs = [
  { op = "tmpfs", dest = "/tmp", mode = 0o700, size = 1048576 },
  { op = "bind", src = "/srv", dest = "/srv", try = true },
  { op = "file", dest = "/etc/x", content = "hi", mode = "0644" },
]
new_root = true
"""


def test_toml_decodes_into_structs():
    sandbox_spec = spec.decode(TOML, "toml")
    leaf = sandbox_spec.layer.layers[0]
    assert leaf.command == spec.Command(argv=["sh", "-c", "true"])
    assert leaf.companions[0].stdin == "null"
    tmpfs, bind, file = leaf.fs
    assert (tmpfs.mode, tmpfs.size) == (0o700, 1048576)
    assert bind.try_ is True and isinstance(bind, spec.Bind)
    assert file.mode == 0o644 and file.kind == "file"
    spec.check(sandbox_spec, 1000, 1000, known_policies={"default"})


def test_json_and_toml_give_the_same_spec():
    from_toml = spec.decode(TOML, "toml")
    raw = spec.msgspec.json.encode(from_toml)
    assert spec.decode(raw, "json") == from_toml


@pytest.mark.parametrize("bad, expected", [
    ({"name": "l", "fs": [{"op": "bind", "src": "/a", "dest": 3}]},
     "layer 'l': fs[0].dest: Expected `str`, got `int`"),
    ({"name": "l", "fs": [{"op": "bindd", "src": "/a", "dest": "/b"}]},
     "layer 'l': fs[0].op: Invalid value 'bindd'"),
    ({"name": "l", "namespaces": ["users"]}, "layer 'l': namespaces[0]"),
    ({"name": "l", "colour": "red"}, "layer 'l': Object contains unknown field `colour`"),
    ({"name": "l", "fs": [{"op": "tmpfs", "dest": "/t", "mode": "999"}]},
     "layer 'l': fs[0]: mode '999' is not an octal number"),
    ({"name": "l", "layers": [{"name": "m", "uid": "x"}]}, "layer 'm': uid: Expected `int"),
])
def test_type_errors_name_layer_and_field(bad, expected):
    with pytest.raises(spec.SpecError) as err:
        spec.decode(json.dumps({"layer": bad}), "json")
    assert expected in str(err.value)


def rules(layer_dict, **top):
    sandbox_spec = spec.decode(json.dumps({"layer": layer_dict, **top}), "json")
    with pytest.raises(spec.SpecError) as err:
        spec.check(sandbox_spec, 1000, 1000, known_policies={"default"})
    return err.value.problems


def test_rules_are_all_reported_with_layer_op_index_and_field():
    problems = rules({
        "name": "top", "namespaces": ["pid", "uts"], "command": ["true"], "uid": 0,
        "fs": [{"op": "bind", "src": "rel", "dest": "/x"}],
        "layers": [{"name": "top"}, {"name": "bad name!", "hostname": "h"}],
    })
    assert problems == [
        "layer 'top': uid: needs a user namespace; add \"user\" to namespaces",
        "layer 'top': namespaces: \"pid\" needs \"mount\" too (the layer mounts its own /proc)",
        "layer 'top': fs: needs a mount namespace; add \"mount\"",
        "layer 'top': fs[0] (bind): src: 'rel' must be an absolute path",
        "layer 'top': name: is used by another layer; layer names must be unique",
        "layer 'bad name!': name: must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        "layer 'bad name!': hostname: needs a uts namespace; add \"uts\" to namespaces",
    ]


@pytest.mark.parametrize("layer_dict, top, expected", [
    ({"name": "l"}, {}, "main: no layer has a command"),
    ({"name": "l", "command": ["x"]}, {"main": "nope"}, "main: names layer 'nope'"),
    ({"name": "l", "namespaces": ["user", "mount"], "new_root": True, "command": ["x"],
      "fs": [{"op": "dev", "dest": "/dev"}]}, {},
     "fs[0] (dev): op: a devpts mount needs uid 0 and gid 0 mapped"),
    ({"name": "l", "namespaces": ["mount"], "command": ["x"],
      "fs": [{"op": "dir", "dest": "/d"}]}, {}, "needs new_root = true"),
    ({"name": "l", "namespaces": ["mount"], "command": ["x"], "new_root": True,
      "fs": [{"op": "bind", "src": "/a", "dest": "/b/../c"}]}, {}, "must not contain '..'"),
    ({"name": "l", "namespaces": ["mount"], "command": ["x"], "new_root": True,
      "fs": [{"op": "ro-overlay", "lower": ["/a"], "dest": "/o"}]}, {}, "at least 2 lower"),
    ({"name": "l", "namespaces": ["mount"], "command": ["x"], "new_root": True,
      "fs": [{"op": "file", "dest": "/f"}]}, {}, "give exactly one of content, data or fd"),
    ({"name": "l", "command": ["x"], "caps": ["sys_wizard"]}, {}, "unknown capability"),
    ({"name": "l", "command": ["x"], "seccomp": {"policy": "nope"}}, {}, "unknown policy"),
    ({"name": "l", "namespaces": ["user"], "command": ["x"], "uid": 5,
      "uid_map": [{"inside": 0, "outside": 1000}]}, {}, "does not map the layer's own id 5"),
    ({"name": "l", "namespaces": ["mount"], "command": ["x"], "new_root": True,
      "fs": [{"op": "mqueue", "dest": "/m"}]}, {}, "mqueue needs an ipc namespace"),
    ({"name": "l", "command": ["x"], "user_namespaces": "deny"}, {},
     "user_namespaces: \"deny\" sets the limit of the layer's own user namespace"),
    ({"name": "l", "namespaces": ["user"], "command": ["x"], "user_namespaces": "deny",
      "caps": ["CAP_SYS_RESOURCE"]}, {}, "could raise the limit again"),
    ({"name": "l", "command": ["x"], "command_replaces_supervisor": True,
      "companions": [["y"]]}, {}, "leaves no supervisor for companions"),
    ({"name": "l", "command_replaces_supervisor": True, "layers": [
        {"name": "m", "command": ["x"]}]}, {}, "command_replaces_supervisor: needs a command"),
    ({"name": "l", "command": ["x"], "lock_files": ["rel"]}, {}, "lock_files[0]: 'rel' must"),
    ({"name": "l", "layers": [{"name": "m", "command": ["x"], "join": {"user": 3}}]}, {},
     "layer 'm': join: only the top layer"),
    ({"name": "l", "namespaces": ["user"], "command": ["x"], "join": {"user": 3}}, {},
     "join.user: joins a user namespace"),
    ({"name": "l", "namespaces": ["mount", "pid"], "command": ["x"], "join": {"pid": 3}}, {},
     "put \"pid\" in a sub-layer's namespaces"),
    ({"name": "l", "command": ["x"], "rlimits": {"forks": 5}}, {}, "unknown limit 'forks'"),
    ({"name": "l", "command": ["x"], "pids_limit": 0}, {}, "pids_limit: must be >= 1"),
    ({"name": "l", "command": ["x"], "seccomp": {"policy": "default", "relax": ["nope"]}}, {},
     "seccomp.relax[0]: unknown group 'nope'"),
    ({"name": "l", "command": ["x"]}, {"userns_block_fd": 3},
     "userns_block_fd: the top layer must create a user namespace"),
])
def test_rule(layer_dict, top, expected):
    assert any(expected in problem for problem in rules(layer_dict, **top))


def test_cli_reports_each_problem_on_one_line_and_exits_2(tmp_path, marker):
    path = write_spec(tmp_path, sandbox({"name": "l", "namespaces": ["pid"], "uid": 3,
                                         "command": ["sh", "-c", f"touch {tmp_path}/ran"]}))
    result = run_engine(str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"bbl: {path}: layer 'l': ")
                                   for line in lines)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent.toml"], "bbl: /nonexistent.toml: cannot read: No such file or directory"),
    (["--info-fd", "99", "x.json"], "bbl: --info-fd 99: not an open file descriptor"),
    (["x.json", "extra"], "bbl: unexpected argument 'extra'"),
])
def test_cli_usage_errors(argv, message):
    result = run_engine(*argv)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [message] or result.stderr.startswith(message)


def test_cli_rejects_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    result = run_engine(str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"bbl: {path}: not valid JSON")


def test_cli_check_only_starts_nothing(tmp_path):
    path = write_spec(tmp_path, sandbox(app_layer(command=["sh", "-c", f"touch {tmp_path}/x"])))
    result = run_engine("--check", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert not (tmp_path / "x").exists()


def test_prepare_leaves_the_callers_spec_alone():
    from bbld.engine import prepare

    sandbox_spec = spec.decode(json.dumps(sandbox(app_layer(command=["echo"]))), "json")
    first = prepare(sandbox_spec, ["a"])
    second = prepare(sandbox_spec, ["b"])
    assert sandbox_spec.layer.command.argv == ["echo"]
    assert first.root.layer.command.argv == ["echo", "a"]
    assert second.root.layer.command.argv == ["echo", "b"]


def test_unopened_fd_in_spec_is_a_usage_error(tmp_path):
    path = write_spec(tmp_path, sandbox(app_layer(
        command=["true"], fs=[{"op": "file", "dest": "/f", "fd": 77}])))
    result = run_engine(str(path))
    assert result.returncode == 2
    assert result.stderr == "bbl: layer 'app': fd 77 is not open in the caller\n"


def test_the_specs_policy_names_are_the_engines():
    from bbld.engine import seccomp

    assert set(spec.SECCOMP_POLICIES) == set(seccomp.POLICIES)
    assert set(spec.SECCOMP_GROUPS) == set(seccomp.ALL_GROUPS)
