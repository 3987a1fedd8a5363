"""Every filesystem operation, in real mount namespaces, checked from inside the sandbox."""

import os
import stat

import pytest

from tests.conftest import app_layer, layer, py, run_sandbox, sandbox, sh, system_ops


def run_app(tmp_path, script, fs_extra=(), **keys):
    spec = sandbox(app_layer(command=sh(script), fs=system_ops() + list(fs_extra), **keys))
    return run_sandbox(tmp_path, spec)


def test_bind_is_writable_and_reaches_the_host(tmp_path):
    host = tmp_path / "data"
    host.mkdir()
    result = run_app(tmp_path, "echo inside > /data/f && cat /data/f",
                     [{"op": "bind", "src": str(host), "dest": "/data"}])
    assert (result.returncode, result.stdout) == (0, "inside\n")
    assert (host / "f").read_text() == "inside\n"


def test_ro_bind_is_read_only(tmp_path):
    host = tmp_path / "data"
    host.mkdir()
    result = run_app(tmp_path, "touch /data/f; echo rc=$?",
                     [{"op": "ro-bind", "src": str(host), "dest": "/data"}])
    assert "Read-only file system" in result.stderr and "rc=1" in result.stdout
    assert not (host / "f").exists()


def nested_submount_spec(tmp_path, script, inner_ops):
    """Layer `outer` puts a tmpfs submount under /work/sub; `inner` binds /work from it."""
    outer = app_layer("outer", fs=system_ops() + [
        {"op": "tmpfs", "dest": "/work"},
        {"op": "tmpfs", "dest": "/work/sub"},
        {"op": "file", "dest": "/work/sub/file", "content": "x"},
    ])
    inner = layer("inner", namespaces=["user", "mount", "pid"], new_root=True,
                  fs=system_ops(dev=False) + inner_ops, command=sh(script))
    outer["layers"] = [inner]
    return sandbox(outer)


def test_ro_bind_is_read_only_on_every_submount(tmp_path):
    spec = nested_submount_spec(
        tmp_path, "touch /w/new; touch /w/sub/new; echo x >> /w/sub/file; "
        "grep ' /w' /proc/self/mountinfo",
        [{"op": "ro-bind", "src": "/work", "dest": "/w"}])
    result = run_sandbox(tmp_path, spec)
    assert result.stderr.count("Read-only file system") == 3, result.stderr
    mounts = result.stdout.splitlines()
    assert len(mounts) == 2 and all(" ro," in m for m in mounts)


def test_remounting_a_read_only_bind_writable_fails(tmp_path):
    # Full capabilities in a nested user namespace still cannot lift a read-only flag set by
    # the parent layer: the kernel locks it.
    remount = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True);"
               "rc = libc.mount(None, b'/w', None, 32 | 4096 | 2 | 4, None);"
               "print('remount', rc, ctypes.get_errno());"
               "rc = libc.umount2(b'/w', 2); print('umount', rc, ctypes.get_errno())")
    spec = nested_submount_spec(tmp_path, "", [{"op": "ro-bind", "src": "/work", "dest": "/w"}])
    inner = spec["layer"]["layers"][0]
    inner["layers"] = [layer("attacker", namespaces=["user", "mount"], uid=0, gid=0,
                             caps=["sys_admin"], command=py(remount))]
    inner.pop("command")
    result = run_sandbox(tmp_path, spec)
    assert result.returncode == 0, result.stderr
    assert "remount -1 1\n" in result.stdout  # EPERM: the read-only flag is locked
    assert "umount -1 22\n" in result.stdout  # EINVAL: mounts from the parent are locked


def test_binds_are_nosuid_and_nodev_but_dev_bind_keeps_devices(tmp_path):
    script = ("grep -E ' /(usr|hostdev|devbind) ' /proc/self/mountinfo; "
              "head -c1 /hostdev/null; echo rc=$?; echo ok > /devbind/null && echo devbind-ok")
    result = run_app(tmp_path, script, [
        {"op": "bind", "src": "/dev", "dest": "/hostdev"},
        {"op": "dev-bind", "src": "/dev", "dest": "/devbind"},
    ])
    lines = {line.split()[4]: line.split()[5] for line in result.stdout.splitlines()
             if line.count(" ") > 5}
    assert "nosuid" in lines["/usr"] and "nodev" in lines["/usr"]
    assert "nodev" in lines["/hostdev"] and "nodev" not in lines["/devbind"]
    assert "nosuid" in lines["/devbind"]
    assert "Permission denied" in result.stderr and "rc=1" in result.stdout
    assert "devbind-ok" in result.stdout


def test_setuid_binaries_do_not_elevate(tmp_path):
    if not os.path.exists("/usr/bin/su") or not os.stat("/usr/bin/su").st_mode & stat.S_ISUID:
        pytest.skip("needs a setuid /usr/bin/su on the host")
    spec = sandbox(app_layer(command=sh("ls -l /usr/bin/su; grep ' /usr ' /proc/self/mountinfo"),
                             uid=None, gid=None, fs=system_ops(dev=False)))
    result = run_sandbox(tmp_path, spec)
    assert "rws" in result.stdout and "nosuid" in result.stdout


def test_symlink_at_destination_stays_inside_the_new_root(tmp_path):
    host = tmp_path / "host-target"
    host.mkdir()
    result = run_app(tmp_path, f"ls {host}; ls -ld /escape", [
        {"op": "symlink", "target": str(host), "dest": "/escape"},
        {"op": "tmpfs", "dest": "/escape/mounted"},
        {"op": "symlink", "target": "../../../../../../" + str(host), "dest": "/escape2"},
        {"op": "file", "dest": "/escape2/file", "content": "x"},
    ])
    assert result.returncode == 0, result.stderr
    assert "mounted" in result.stdout and "file" in result.stdout
    assert os.listdir(host) == []  # the host directory was never touched


def test_mount_points_are_never_created_in_bound_host_directories(tmp_path, marker):
    host = tmp_path / "data"
    host.mkdir()
    result = run_app(tmp_path, f"touch {tmp_path}/ran", [
        {"op": "bind", "src": str(host), "dest": "/data"},
        {"op": "tmpfs", "dest": "/data/sub/dir"},
    ])
    assert result.returncode == 2
    assert result.stderr.startswith("bbl: layer 'app': fs[")
    assert "(tmpfs) /data/sub/dir: cannot create /data/sub: its parent is not on a filesystem" \
        in result.stderr
    assert os.listdir(host) == [] and not (tmp_path / "ran").exists()


def test_tmpfs_mode_and_size(tmp_path):
    result = run_app(tmp_path, "stat -c %a /scratch; df -k /scratch | tail -1", [
        {"op": "tmpfs", "dest": "/scratch", "mode": "1750", "size": 2 * 1024 * 1024}])
    mode, df = result.stdout.splitlines()
    assert mode == "1750" and df.split()[1] == "2048"


def test_dir_symlink_file_chmod(tmp_path):
    result = run_app(tmp_path, "stat -c '%a %F' /a/b/c; readlink /lnk; cat /etc2/f; "
                     "stat -c %a /etc2/f /etc2", [
                         {"op": "dir", "dest": "/a/b/c", "mode": "0710"},
                         {"op": "symlink", "target": "/a/b", "dest": "/lnk"},
                         {"op": "file", "dest": "/etc2/f", "content": "text\n", "mode": "0640"},
                         {"op": "chmod", "path": "/etc2", "mode": "0700"},
                     ])
    assert result.stdout.splitlines() == ["710 directory", "/a/b", "text", "640", "700"]


def test_file_and_bind_data_from_fds(tmp_path):
    data_r, data_w = os.pipe()
    os.write(data_w, b"from a pipe\n")
    os.close(data_w)
    other = os.open(tmp_path, os.O_RDONLY)
    (tmp_path / "bound").write_text("bound data\n")
    bound = os.open(tmp_path / "bound", os.O_RDONLY)
    try:
        spec = sandbox(app_layer(command=sh("cat /f /bd /rbd; echo x > /rbd; stat -c %a /bd"),
                                 fs=system_ops() + [
                                     {"op": "file", "dest": "/f", "fd": data_r},
                                     {"op": "bind-data", "dest": "/bd", "fd": bound},
                                     {"op": "ro-bind-data", "dest": "/rbd", "content": "ro\n"},
                                 ]))
        result = run_sandbox(tmp_path, spec, pass_fds=(data_r, bound, other))
    finally:
        for fd in (data_r, other, bound):
            os.close(fd)
    assert result.stdout == "from a pipe\nbound data\nro\n600\n"
    assert "Read-only file system" in result.stderr


def test_bind_fd_and_remount_ro(tmp_path):
    host = tmp_path / "d"
    host.mkdir()
    (host / "f").write_text("hello")
    fd = os.open(host, os.O_PATH | os.O_DIRECTORY)
    try:
        spec = sandbox(app_layer(command=sh("cat /byfd/f; echo x >> /rw/f; echo rc=$?"),
                                 fs=system_ops() + [
                                     {"op": "bind-fd", "fd": fd, "dest": "/byfd"},
                                     {"op": "bind", "src": str(host), "dest": "/rw"},
                                     {"op": "remount-ro", "dest": "/rw"},
                                 ]))
        result = run_sandbox(tmp_path, spec, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert result.stdout == "hellorc=2\n", result.stderr
    assert (host / "f").read_text() == "hello"


def test_remount_ro_of_a_plain_directory_is_an_error(tmp_path):
    result = run_app(tmp_path, "true", [{"op": "dir", "dest": "/d"},
                                        {"op": "remount-ro", "dest": "/d"}])
    assert result.returncode == 2
    assert "(remount-ro) /d: is not a mount point" in result.stderr


def test_proc_shows_only_the_sandbox_pid_namespace(tmp_path):
    result = run_app(tmp_path, "ls /proc | grep -c '^[0-9]'")
    assert int(result.stdout) <= 4  # supervisor, sh, ls, grep


def test_dev_is_minimal_and_usable(tmp_path):
    script = ("ls /dev | sort | tr '\\n' ' '; echo; echo x > /dev/null && echo null-ok; "
              "stat -c %a /dev; test -c /dev/pts/ptmx && echo pts-ok; "
              "python3 -c 'import os; m, s = os.openpty(); print(os.ttyname(s))'")
    result = run_app(tmp_path, script)
    assert result.returncode == 0, result.stderr
    names, *rest = result.stdout.splitlines()
    assert names.split() == sorted(["core", "fd", "full", "null", "ptmx", "pts", "random",
                                    "shm", "stderr", "stdin", "stdout", "tty", "urandom",
                                    "zero"])
    assert rest[:3] == ["null-ok", "755", "pts-ok"] and rest[3].startswith("/dev/pts/")


def test_devpts_and_mqueue(tmp_path):
    result = run_app(tmp_path, "grep -E ' /(pts2|mq) ' /proc/self/mountinfo | sed 's/.* - //'",
                     [{"op": "devpts", "dest": "/pts2"}, {"op": "mqueue", "dest": "/mq"}],
                     namespaces=["user", "mount", "pid", "ipc"])
    assert sorted(line.split()[0] for line in result.stdout.splitlines()) == ["devpts", "mqueue"]


def test_overlays(tmp_path):
    lower1, lower2, upper, work = (tmp_path / n for n in ("l1", "l2", "upper", "work"))
    for d in (lower1, lower2, upper, work):
        d.mkdir()
    (lower1 / "a").write_text("a1")
    (lower2 / "a").write_text("a2")
    (lower2 / "b").write_text("b2")
    script = ("cat /ov/a /ov/b; echo new > /ov/new; echo tmp > /tmpov/new; cat /tmpov/new; "
              "echo ro > /roov/new; echo rc=$?; cat /roov/a")
    result = run_app(tmp_path, script, [
        {"op": "overlay", "lower": [str(lower1), str(lower2)], "upper": str(upper),
         "work": str(work), "dest": "/ov"},
        {"op": "tmp-overlay", "lower": [str(lower2)], "dest": "/tmpov"},
        {"op": "ro-overlay", "lower": [str(lower1), str(lower2)], "dest": "/roov"},
    ])
    assert result.stdout == "a1b2tmp\nrc=2\na1", result.stderr
    assert (upper / "new").read_text() == "new\n"
    assert sorted(os.listdir(lower2)) == ["a", "b"]  # tmp-overlay writes were discarded


def test_mask_makes_paths_empty_and_unreadable(tmp_path):
    host = tmp_path / "secret"
    host.mkdir()
    (host / "key").write_text("s3cret")
    script = (f"ls -A {host}; cat /etc/hostname; echo rc=$?; stat -c %s /etc/hostname; "
              "echo x > /etc/hostname; echo rc=$?")
    spec = sandbox(layer("app", namespaces=["user", "mount", "pid"], new_root=True,
                         fs=system_ops(dev=False) + [
                             {"op": "ro-bind", "src": str(host), "dest": str(host)},
                             {"op": "mask", "path": str(host)},
                             {"op": "mask", "path": "/etc/hostname"},
                             {"op": "mask", "path": "/does/not/exist"},
                         ], command=sh(script)))
    result = run_sandbox(tmp_path, spec)
    assert "s3cret" not in result.stdout and "key" not in result.stdout
    assert result.stdout.split() == ["rc=1", "0", "rc=2"], (result.stdout, result.stderr)
    assert result.stderr.count("Permission denied") == 2


def test_try_binds_skip_missing_sources_and_plain_binds_fail(tmp_path):
    ok = run_app(tmp_path, "ls /opt-x 2>&1; echo done",
                 [{"op": "ro-bind", "src": "/nonexistent", "dest": "/opt-x", "try": True}])
    assert ok.returncode == 0 and "done" in ok.stdout
    bad = run_app(tmp_path, "true",
                  [{"op": "ro-bind", "src": "/nonexistent", "dest": "/opt-x"}])
    assert bad.returncode == 2
    assert bad.stderr == ("bbl: layer 'app': fs[9] (ro-bind) /opt-x: source /nonexistent does "
                          "not exist in the parent layer's view\n")


def test_in_place_layer_masks_without_new_root(tmp_path):
    outer = app_layer("outer")
    outer["layers"] = [layer("inplace", namespaces=["mount"],
                             fs=[{"op": "mask", "path": "/etc/passwd"},
                                 {"op": "tmpfs", "dest": "/tmp", "mode": "0700"}],
                             command=sh("stat -c %s /etc/passwd; cat /etc/passwd; "
                                        "stat -c %a /tmp"))]
    result = run_sandbox(tmp_path, sandbox(outer))
    assert result.stdout.split() == ["0", "700"], result.stderr
    assert "Permission denied" in result.stderr


def test_the_old_root_is_gone_and_pid_1_root_is_out_of_reach(tmp_path):
    (tmp_path / "canary").write_text("host")
    script = (f"cat {tmp_path}/canary; ls /proc/1/root/ 2>&1 | head -1; "
              "cut -d' ' -f4,5 /proc/self/mountinfo | grep -cE 'oldroot|newroot|canary'; "
              "cd /proc/1/cwd 2>&1; echo end")
    me = os.getuid()
    leaf = layer("leaf", namespaces=["user", "mount", "pid"], uid=me, gid=me, command=sh(script))
    result = run_sandbox(tmp_path, sandbox(app_layer("outer", layers=[leaf])))
    assert "host" not in result.stdout
    assert "No such file or directory" in result.stderr  # the canary
    lines = result.stdout.splitlines()
    assert "Permission denied" in lines[0] and lines[1] == "0" and lines[-1] == "end"
    assert "can't cd to /proc/1/cwd" in lines[2]


def test_read_only_file_binds_from_a_locked_nosuid_nodev_mount_work(tmp_path):
    # The outer layer's tmpfs is nosuid+nodev; in the inner user namespace those flags are
    # locked. Remounting a file bind read-only must keep them (BBL's script failed here).
    spec = nested_submount_spec(
        tmp_path, "cat /f; echo x > /f; grep ' /f ' /proc/self/mountinfo",
        [{"op": "ro-bind", "src": "/work/sub/file", "dest": "/f"}])
    result = run_sandbox(tmp_path, spec)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("x") and "Read-only file system" in result.stderr
    assert " ro,nosuid,nodev" in result.stdout
