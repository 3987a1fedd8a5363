"""BBL's default template shape: layer1 -> layer2 -> {layer2a, layer2h -> layer3 ->
{layer4, layer4a}}, where the app in layer4 sees exactly what layer3's plan exposes."""

import os

from tests.conftest import layer, processes_with, run_sandbox, sandbox, sh, wait_gone

LAYER3_PLAN = [
    {"op": "ro-bind", "src": "/usr", "dest": "/usr"},
    {"op": "symlink", "target": "usr/bin", "dest": "/bin"},
    {"op": "symlink", "target": "usr/lib", "dest": "/lib"},
    {"op": "symlink", "target": "usr/lib64", "dest": "/lib64"},
    {"op": "proc", "dest": "/proc"},
    {"op": "dev", "dest": "/dev"},
    {"op": "tmpfs", "dest": "/tmp"},
    {"op": "tmpfs", "dest": "/home/user"},
    {"op": "file", "dest": "/etc/machine-id", "content": "0" * 32, "mode": "0444"},
]


def template(tmp_path, marker, app_script):
    me = os.getuid()
    host_view = [{"op": "ro-bind", "src": f"/{name}", "dest": f"/{name}"}
                 for name in ("usr", "etc") ]
    host_view += [{"op": "symlink", "target": os.readlink(f"/{name}"), "dest": f"/{name}"}
                  for name in ("bin", "lib", "lib64", "sbin") if os.path.islink(f"/{name}")]
    host_view += [{"op": "proc", "dest": "/proc"}, {"op": "dev", "dest": "/dev"},
                  {"op": "bind", "src": str(tmp_path), "dest": str(tmp_path)},
                  {"op": "mask", "path": str(tmp_path / "private")}]
    companion = {"argv": ["sleep", "1000"], "argv0": marker}
    layer4 = layer("layer4", namespaces=["user", "pid", "mount"], uid=me, gid=me,
                   seccomp={"policy": "default"}, command=sh(app_script))
    layer4a = layer("layer4a", namespaces=["user", "pid", "mount"], uid=me, gid=me,
                    companions=[companion])
    layer3 = layer("layer3", namespaces=["mount", "pid", "ipc", "uts", "net", "cgroup", "time"],
                   hostname="untrusted", new_root=True, fs=LAYER3_PLAN,
                   layers=[layer4, layer4a])
    layer2h = layer("layer2h", namespaces=["mount"], layers=[layer3])
    layer2a = layer("layer2a", namespaces=["user", "pid", "mount"], uid=me, gid=me,
                    companions=[companion])
    layer2 = layer("layer2", namespaces=["mount"], new_root=True, fs=host_view,
                   layers=[layer2a, layer2h])
    layer1 = layer("layer1", namespaces=["user", "pid", "mount"], uid=0, gid=0,
                   layers=[layer2])
    return sandbox(layer1, name="template", main="layer4")


def test_app_layer_sees_exactly_layer3s_plan(tmp_path, marker):
    (tmp_path / "private").mkdir()
    (tmp_path / "canary").write_text("host secret")
    script = ("ls -A / | tr '\\n' ' '; echo; cut -d' ' -f5 /proc/self/mountinfo | sort | "
              "tr '\\n' ' '; echo; hostname; id -u; cat /etc/machine-id; echo; "
              f"cat {tmp_path}/canary 2>&1; grep -E 'CapEff|NoNewPrivs' /proc/self/status")
    result = run_sandbox(tmp_path, template(tmp_path, marker, script))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == sorted(["bin", "dev", "etc", "home", "lib", "lib64", "proc",
                                       "tmp", "usr"])
    mount_points = set(lines[1].split())
    assert mount_points == {"/", "/usr", "/proc", "/dev", "/dev/null", "/dev/zero", "/dev/full",
                            "/dev/random", "/dev/urandom", "/dev/tty", "/dev/shm", "/dev/pts",
                            "/tmp", "/home/user"}
    assert lines[2:5] == ["untrusted", str(os.getuid()), "0" * 32]
    assert "No such file or directory" in lines[5]  # the host canary is not there
    assert lines[6:] == ["CapEff:\t0000000000000000", "NoNewPrivs:\t1"]
    assert wait_gone(processes_with(marker)) == []  # companions ended with the app


def test_template_layers_have_the_namespaces_the_design_says(tmp_path, marker):
    (tmp_path / "private").mkdir()
    result = run_sandbox(tmp_path, template(tmp_path, marker, "true"))
    assert result.returncode == 0, result.stderr
    ns = {entry["layer"]: entry["namespaces"] for entry in result.info}
    assert list(ns) == ["layer1", "layer2", "layer2a", "layer2h", "layer3", "layer4", "layer4a"]
    same = lambda kind, *names: len({ns[n][kind] for n in names}) == 1  # noqa: E731
    assert same("user", "layer1", "layer2", "layer2h", "layer3")
    assert len({ns[n]["user"] for n in ("layer1", "layer2a", "layer4", "layer4a")}) == 4
    assert same("pid", "layer1", "layer2", "layer2h")
    assert len({ns[n]["pid"] for n in ("layer1", "layer2a", "layer3", "layer4", "layer4a")}) == 5
    assert len({ns[n]["mnt"] for n in ns}) == 7
    assert same("net", "layer1", "layer2", "layer2a", "layer2h")
    assert ns["layer3"]["net"] != ns["layer2h"]["net"] and same("net", "layer3", "layer4")


def test_masked_host_path_is_unreadable_from_layer2_on(tmp_path, marker):
    private = tmp_path / "private"
    private.mkdir()
    (private / "key").write_text("k")
    spec = template(tmp_path, marker, "true")
    layer2a = spec["layer"]["layers"][0]["layers"][0]
    layer2a["command"] = sh(f"ls -A {private}; echo rc=$?")
    spec["main"] = "layer2a"
    result = run_sandbox(tmp_path, spec)
    assert "key" not in result.stdout and "rc=2" in result.stdout, result


def test_nothing_the_app_can_read_of_its_sandboxs_processes_names_the_host(instances, tmp_path):
    """Every command line (and comm) the app's layer can read: no interpreter or venv path,
    no BBL runtime directory, no host uid (a supervisor forked from the monitor showed the
    monitor's: `…/venv/bin/python3 -I -m bbld.monitors.forker 18 /run/user/UID/bbl/…`)."""
    import sys

    path = tmp_path / "look.toml"
    path.write_text('command = ["sh", "-c", "for p in /proc/[0-9]*; do [ $p = /proc/$$ ] || '
                    "{ tr '\\\\0' ' ' < $p/cmdline; echo; cat $p/comm; }; done\"]\n")
    result = instances.ctl("start", str(path), stdin=open(os.devnull))
    assert result.returncode == 0, result.stderr
    seen = result.stdout
    assert "bbl-layer layer4" in seen  # (the layer's supervisor, pid 1 there)
    for host in (sys.prefix, instances.env["XDG_RUNTIME_DIR"], "bbld", "python"):
        assert host not in seen, (host, seen)
