"""bubblewrap's command line as bbld.bwrap parses it; messages compared with Debian's bwrap."""

import os
import shutil
import subprocess

import pytest

from bbld import bwrap, spec
from bbld.engine.errors import StartError

BWRAP = shutil.which("bwrap")


def parse(*argv, env=None):
    return bwrap.parse(list(argv), env if env is not None else {"HOME": "/h", "A": "1"})


def error_of(*argv) -> str:
    with pytest.raises(bwrap.ParseError) as err:
        parse(*argv)
    return str(err.value)


def test_options_are_processed_in_order_and_parsing_stops_at_the_command():
    inv = parse("--ro-bind", "/usr", "/usr", "--perms", "0700", "--tmpfs", "/tmp",
                "--size", "4096", "--tmpfs", "/t2", "--symlink", "usr/bin", "/bin",
                "--unshare-all", "--share-net", "--hostname", "h", "--setenv", "B", "2",
                "--unsetenv", "A", "sh", "--bind", "x")
    assert inv.command == ["sh", "--bind", "x"]
    assert inv.ops == [spec.RoBind(src="/usr", dest="/usr", parents_mode=0o700),
                       spec.Tmpfs(dest="/tmp", mode=0o700, parents_mode=0o700),
                       spec.Tmpfs(dest="/t2", mode=0o755, size=4096, parents_mode=0o755),
                       spec.Symlink(target_path="usr/bin", dest="/bin", parents_mode=0o700)]
    assert inv.unshare == ["user-try", "ipc", "pid", "uts", "cgroup-try"]
    assert inv.env == {"HOME": "/h", "B": "2"}


def test_double_dash_and_clearenv_order():
    inv = parse("--setenv", "X", "1", "--clearenv", "--setenv", "Y", "2", "--", "--weird")
    assert inv.command == ["--weird"] and inv.env == {"Y": "2"}


def test_args_fd_is_parsed_in_place_and_its_command_is_ignored():
    r, w = os.pipe()
    os.write(w, b"--dir\0/d\0--chdir\0/d\0ignored-command\0--bind\0")
    os.close(w)
    inv = parse("--args", str(r), "--tmpfs", "/t", "true")
    assert inv.ops == [spec.Dir(dest="/d", mode=0o755, parents_mode=0o755),
                       spec.Tmpfs(dest="/t", mode=0o755, parents_mode=0o755)]
    assert inv.chdir == "/d" and inv.command == ["true"]
    with pytest.raises(OSError):
        os.fstat(r)  # read to EOF and closed


def test_repeated_last_wins_options_warn():
    inv = parse("--chdir", "/a", "--chdir", "/b", "true")
    assert inv.chdir == "/b"
    assert inv.warnings == ["Only the last --chdir option will take effect"]


def test_overlays_collect_their_sources():
    inv = parse("--overlay-src", "/a", "--overlay-src", "/b", "--overlay", "/u", "/w", "/o",
                "--overlay-src", "/c", "--tmp-overlay", "/t", "true")
    # the last --overlay-src is the top layer, which a spec lists first
    assert inv.ops == [spec.Overlay(lower=["/b", "/a"], upper="/u", work="/w", dest="/o",
                                    parents_mode=0o700),
                       spec.TmpOverlay(lower=["/c"], dest="/t", parents_mode=0o700)]


@pytest.mark.parametrize("perms, parents", [
    (0o755, 0o755), (0o750, 0o750), (0o711, 0o755), (0o604, 0o705), (0o600, 0o700),
    (0o666, 0o755), (0, 0o700)])
def test_created_parents_take_what_the_operations_perms_give_group_and_others(perms, parents):
    """bubblewrap's rule, measured: 0755 less group r-x when the perms give the group
    nothing, less others' r-x likewise; an operation without perms counts as 0."""
    inv = parse("--perms", f"{perms:o}", "--dir", "/a/b", "--bind", "/x", "/c/d", "true")
    assert [op.parents_mode for op in inv.ops] == [parents, 0o700]


def test_add_seccomp_fd_is_read_while_parsing():
    r, w = os.pipe()
    os.write(w, b"\x06\0\0\0\0\0\xff\x7f")
    os.close(w)
    assert parse("--add-seccomp-fd", str(r), "true").seccomp_programs == [
        b"\x06\0\0\0\0\0\xff\x7f"]


@pytest.mark.parametrize("argv, message", [
    (["--argv0", "a", "--argv0", "b", "true"], "--argv0 used multiple times"),
    (["--ro-overlay", "/x", "true"], "--ro-overlay requires at least 2 --overlay-src"),
    (["--overlay-src", "/a", "--dir", "/x", "true"],
     "--overlay-src must be followed by another --overlay-src or one of --overlay, "
     "--tmp-overlay, or --ro-overlay"),
    (["--bind", "/a"], "--bind takes two arguments"),
])
def test_errors_of_options_debian_bwrap_lacks(argv, message):
    assert error_of(*argv) == message


def test_help_and_version():
    with pytest.raises(bwrap.Help):
        parse("--unshare-pid", "--help")
    with pytest.raises(bwrap.Version):
        parse("--version")
    assert bwrap.usage("bbl-bwrap").startswith("usage: bbl-bwrap [OPTIONS...] [--] COMMAND")


# Command lines that bubblewrap refuses while parsing, with options Debian's 0.8.0 knows.
REFUSED = [
    ["--foo", "true"], ["--bind", "/a"], ["--tmpfs"], ["--setenv", "A"], ["--block-fd"],
    ["--hostname", "x", "true"], ["--as-pid-1", "true"],
    ["--unshare-pid", "--as-pid-1", "--lock-file", "/x", "true"],
    ["--perms", "9999", "--dir", "/x", "true"], ["--perms", "0755", "--perms", "0700", "true"],
    ["--size", "10", "--dir", "/x", "true"], ["--size", "abc", "--tmpfs", "/x", "true"],
    ["--size", "0", "--tmpfs", "/x", "true"], ["--bind-fd", "x", "/a", "true"],
    ["--bind-fd", "-1", "/a", "true"], ["--chmod", "99999", "/x", "true"],
    ["--cap-add", "FOO", "true"], ["--userns", "3", "--unshare-user", "true"],
    ["--exec-label", "x", "true"], ["--perms", "0700", "--bind", "/a", "/b", "true"],
    ["--args", "99", "true"], ["--size", "5", "--size", "6", "--tmpfs", "/x", "true"],
]


@pytest.mark.skipif(BWRAP is None, reason="Debian's bubblewrap is not installed")
@pytest.mark.parametrize("argv", REFUSED, ids=" ".join)
def test_same_message_as_bubblewrap(argv):
    theirs = subprocess.run([BWRAP, *argv], capture_output=True, text=True, timeout=20)
    assert theirs.returncode == 1
    assert f"bwrap: {error_of(*argv)}" == theirs.stderr.splitlines()[0]


@pytest.mark.skipif(BWRAP is None, reason="Debian's bubblewrap is not installed")
@pytest.mark.parametrize("argv", [[], ["--"], ["--unshare-all"]])
def test_no_command_is_a_usage_error_like_bubblewrap(argv):
    theirs = subprocess.run([BWRAP, *argv], capture_output=True, text=True, timeout=20)
    assert theirs.returncode == 1 and theirs.stderr.startswith("usage: ")
    assert error_of(*argv) == "usage"


# ---------------------------------------------------------------- running what it means

SYSTEM = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib",
          "/lib", "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin"]
SAME_OUTPUT = [
    [*SYSTEM, "--proc", "/proc", "--dev", "/dev", "--unshare-all", "sh", "-c",
     "id -u; ls /; ls /dev; hostname >/dev/null && echo ok; "
     "readlink /proc/self/ns/net | cut -c1-4"],
    [*SYSTEM, "--unshare-user", "--uid", "1234", "--gid", "5678", "--dev", "/dev", "--proc",
     "/proc", "--unshare-pid", "sh", "-c", "id -u; id -g; cat /proc/self/uid_map | wc -l"],
    [*SYSTEM, "--unshare-uts", "--hostname", "box", "--tmpfs", "/tmp", "--perms", "0700",
     "--dir", "/tmp/d", "sh", "-c", "hostname; stat -c %a /tmp/d; echo $FOO", ],
    [*SYSTEM, "--setenv", "FOO", "bar", "--chdir", "/usr", "sh", "-c", "echo $FOO; pwd"],
    [*SYSTEM, "--argv0", "renamed", "sh", "-c", "echo $0"],
    [*SYSTEM, "--unshare-net", "sh", "-c", "cat /proc/net/dev 2>/dev/null | wc -l; true"],
    [*SYSTEM, "--", "sh", "-c", "exit 7"],
]


def run_translated(tmp_path, argv):
    import msgspec

    from tests.conftest import run_engine

    inv = bwrap.parse(argv, dict(os.environ))
    sandbox_spec = bwrap.to_sandbox(inv, os.getuid(), os.getgid())
    path = tmp_path / "bwrap.json"
    path.write_bytes(msgspec.json.encode(sandbox_spec))
    return run_engine(str(path))


@pytest.mark.skipif(BWRAP is None, reason="Debian's bubblewrap is not installed")
@pytest.mark.parametrize("argv", SAME_OUTPUT, ids=lambda a: " ".join(a[len(SYSTEM):])[:60])
def test_a_translated_command_line_behaves_like_bubblewrap(tmp_path, argv):
    if "--argv0" in argv:
        pytest.skip("Debian's bubblewrap 0.8.0 has no --argv0")
    theirs = subprocess.run([BWRAP, *argv], capture_output=True, text=True, timeout=30)
    ours = run_translated(tmp_path, argv)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), ours.stderr


def test_argv0_is_given_to_the_command(tmp_path):
    result = run_translated(tmp_path, [*SYSTEM, "--argv0", "renamed", "sh", "-c", "echo $0"])
    assert result.stdout == "renamed\n", result.stderr


def test_userns2_is_refused_with_the_reason():
    inv = bwrap.parse(["--userns", "3", "--userns2", "4", "true"], {})
    with pytest.raises(bwrap.ParseError) as err:
        bwrap.to_sandbox(inv, 1000, 1000)
    assert str(err.value).startswith("--userns2 is not supported by bbl-bwrap: ")


@pytest.mark.parametrize("error, theirs", [
    (StartError("source /nope does not exist in the parent layer's view", 2, "bwrap",
                what="source-missing", where="fs[0] (bind) /x", path="/nope"),
     "Can't find source path /nope: No such file or directory"),
    (StartError("working directory /d: Permission denied", 2, "sandbox", what="chdir",
                where="command 'true'", path="/d", strerror="Permission denied"),
     "Can't chdir to /d: Permission denied"),
    (StartError("cannot execute: No such file or directory", 2, "bwrap", what="exec",
                where="command 'a b'", strerror="No such file or directory", command="a b"),
     "execvp a b: No such file or directory"),
    (StartError("File exists", 1, "bwrap", what="symlink", where="fs[2] (symlink) /l",
                path="/l", strerror="File exists"),
     "Can't make symlink at /l: File exists"),
    (StartError("cannot create the layer's namespaces: nesting depth or "
                "/proc/sys/user/max_*_namespaces exceeded (ENOSPC)", 1, "bwrap",
                what="namespaces", strerror="nesting depth or "
                "/proc/sys/user/max_*_namespaces exceeded (ENOSPC)"),
     "Creating new namespace failed: nesting depth or /proc/sys/user/max_*_namespaces "
     "exceeded (ENOSPC)"),
    (StartError("lock_files: /x: No such file or directory", 1, "bwrap"),
     "lock_files: /x: No such file or directory"),
    (StartError("is not a mount point", 2, "bwrap", where="fs[1] (remount-ro) /m"),
     "fs[1] (remount-ro) /m: is not a mount point"),
])
def test_start_errors_are_worded_like_bubblewrap_from_their_fields(error, theirs):
    """No regexes over messages: the engine's fields say what happened (rewording a
    message cannot break bubblewrap's words)."""
    assert bwrap.bwrap_message(error.message, error.fields()) == theirs
