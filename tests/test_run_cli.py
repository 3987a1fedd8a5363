"""`bblctl run` / bbl-bwrap end to end: through the daemon, like bubblewrap."""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import Session, processes_with, read_line, wait_gone, wait_until

RUN = [sys.executable, "-m", "bblctl", "run"]
SYSTEM = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib",
          "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev"]


@pytest.fixture
def env(bbl_env):
    """A private daemon for this test; ended by pid afterwards."""
    return bbl_env


def bblrun(env, *argv, **kw):
    return subprocess.run([*RUN, *argv], env=env, capture_output=True, text=True, timeout=60,
                          **kw)


def test_with_bbld_running_the_monitor_says_what_bwrap_says_and_leaves_nothing(env, tmp_path):
    """With a daemon, the command line is interpreted in the instance's monitor: the same
    words and statuses, and nothing left behind."""
    assert bblrun(env, "--ro-bind", "/", "/", "true").returncode == 0  # bbld runs now
    result = bblrun(env, "--foo", "true")
    assert (result.returncode, result.stderr) == (1, "bwrap: Unknown option --foo\n")
    prefixed = bblrun(env, "--level-prefix", "--ro-bind", "/nonexistent", "/x", "true")
    assert prefixed.returncode == 1 and prefixed.stderr.startswith("<3>bwrap: Can't find")
    assert bblrun(env, "--version").stdout == "bubblewrap 0.11.1\n"
    assert bblrun(env, "--help").stdout.startswith("usage: bblctl run [OPTIONS...]")
    warned = bblrun(env, "--ro-bind", "/", "/", "--chdir", "/", "--chdir", "/", "true")
    assert (warned.returncode, warned.stderr) == (
        0, "bwrap: Only the last --chdir option will take effect\n")
    assert os.listdir(tmp_path / "run" / "bbl" / "instances") == []
    ps = subprocess.run([sys.executable, "-m", "bblctl", "ps", "--json"], env=env,
                        capture_output=True, text=True, timeout=30)
    assert json.loads(ps.stdout) == []


def test_the_usage_names_the_program_as_it_was_called(env, tmp_path):
    """Scripts call bbl-bwrap as `bwrap` through a symlink (and grep the usage for it)."""
    (tmp_path / "bwrap").symlink_to(os.path.join(os.path.dirname(sys.executable), "bbl-bwrap"))
    path = {**env, "PATH": f"{tmp_path}:{env.get('PATH', '/usr/bin:/bin')}"}
    for daemon in (False, True):  # (the client words it, then the instance's monitor)
        if daemon:
            assert bblrun(env, "--ro-bind", "/", "/", "true").returncode == 0
        for argv, stream in ((["--help"], "stdout"), ([], "stderr")):
            result = subprocess.run(["bwrap", *argv], env=path, capture_output=True,
                                    text=True, timeout=60)
            assert getattr(result, stream).startswith(
                "usage: bwrap [OPTIONS...] [--] COMMAND [ARGS...]\n"), result


def test_fds_the_command_line_does_not_name_stay_out_and_are_let_go(env):
    """bbl-bwrap sends every open fd along; the monitor closes the ones not named, so the
    sandbox never sees them and nobody holds them once the client has gone."""
    assert bblrun(env, "--ro-bind", "/", "/", "true").returncode == 0  # bbld runs now
    unnamed_r, unnamed_w = os.pipe()
    named_r, named_w = os.pipe()
    os.write(named_w, b"named\n")
    os.close(named_w)

    def place():
        os.dup2(unnamed_w, 7)
        os.dup2(named_r, 8)

    result = subprocess.run(
        [*RUN, "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--file", "8", "/tmp/named",
         "sh", "-c", "ls /proc/self/fd; cat /tmp/named"], env=env, capture_output=True,
        text=True, timeout=60, preexec_fn=place, pass_fds=(7, 8))
    os.close(unnamed_w)
    os.close(named_r)
    fds = result.stdout.split()
    assert result.returncode == 0 and fds[-1] == "named", result.stderr
    assert "7" not in fds[:-1] and "8" not in fds[:-1]
    ready, _, _ = select.select([unnamed_r], [], [], 10)  # EOF: no copy is left anywhere
    assert ready and os.read(unnamed_r, 1) == b""
    os.close(unnamed_r)


def test_status_stdio_and_the_whole_host_root(env):
    result = bblrun(env, "--ro-bind", "/", "/", "--unshare-all", "sh", "-c",
                    "read x; echo got $x; echo err >&2; touch /x; exit 9", input="line\n")
    assert result.returncode == 9
    assert result.stdout == "got line\n"
    assert result.stderr.startswith("err\n") and "Read-only file system" in result.stderr


def test_bad_command_lines_are_bubblewraps_errors(env, tmp_path):
    result = bblrun(env, "--foo", "true")
    assert (result.returncode, result.stderr) == (1, "bwrap: Unknown option --foo\n")
    assert not (tmp_path / "run" / "bbl").exists()  # nothing started for a bad command line
    usage = bblrun(env)
    assert usage.returncode == 1 and usage.stderr.startswith("usage: bblctl run [OPTIONS...]")
    assert bblrun(env, "--version").stdout == "bubblewrap 0.11.1\n"
    prefixed = bblrun(env, "--level-prefix", "--foo", "true")
    assert (prefixed.returncode, prefixed.stderr) == (1, "<3>bwrap: Unknown option --foo\n")


def test_start_failures_are_one_line_and_status_1(env):
    result = bblrun(env, *SYSTEM, "--bind", "/nonexistent", "/x", "true")
    assert (result.returncode, result.stderr) == (
        1, "bwrap: Can't find source path /nonexistent: No such file or directory\n")


def test_fds_named_by_options_travel_to_the_sandbox(env, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("through an fd\n")
    data_r, data_w = os.pipe()
    os.write(data_w, b"data\n")
    os.close(data_w)
    directory = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        result = bblrun(env, *SYSTEM, "--bind-fd", str(directory), "/mnt", "--file",
                        str(data_r), "/etc-data", "sh", "-c", "cat /mnt/f /etc-data",
                        pass_fds=(directory, data_r))
    finally:
        os.close(directory)
        os.close(data_r)
    assert (result.returncode, result.stdout) == (0, "through an fd\ndata\n"), result.stderr


@pytest.mark.parametrize("sandbox", [[*SYSTEM, "--unshare-pid"], ["--ro-bind", "/", "/"]],
                         ids=["pid namespace", "the command is layer 1"])
def test_signals_to_the_client_reach_the_command(env, marker, sandbox):
    proc = subprocess.Popen([*RUN, *sandbox, "sh", "-c",
                             "trap 'echo term; exit 42' TERM; echo ready; "
                             "while :; do sleep 0.05; done", marker], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        assert read_line(proc.stdout) == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for pid in processes_with(marker):  # the instance outlives a killed client
            os.kill(pid, signal.SIGKILL)
    assert (proc.returncode, out) == (42, "term\n"), err


def test_without_a_pid_namespace_the_command_is_layer_1_itself(env):
    """bubblewrap's default: no supervisor forks the command (plan._replace_main_supervisor);
    bblctl tree says so, and stop still ends it."""
    proc = subprocess.Popen([*RUN, "--name", "flat", "--ro-bind", "/", "/", "sh", "-c",
                             "echo $$; exec sleep 600"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = int(read_line(proc.stdout))
        drawn = subprocess.run([sys.executable, "-m", "bblctl", "tree", "flat"], env=env,
                               capture_output=True, text=True, timeout=30).stdout
        assert f"bwrap  pid {pid} (the command itself)  uid" in drawn, drawn
        subprocess.run([sys.executable, "-m", "bblctl", "stop", "flat"], env=env,
                       timeout=30, check=True)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        _end_flat(env, proc)
    assert wait_gone([pid]) == []


def _end_flat(env, proc) -> None:
    """End the instance named flat and its client, whatever a failed assertion left (its
    command holds the client's stdout: a client killed alone would never see EOF)."""
    if proc.poll() is None:
        subprocess.run([sys.executable, "-m", "bblctl", "kill", "flat"], env=env,
                       capture_output=True, timeout=30)
        proc.kill()
    proc.communicate(timeout=30)


def test_exec_into_a_layer_1_without_supervisor_gets_each_status(env):
    """The monitor adopts the sandbox's orphans there and reaps them as they end; what exec
    started is followed by pidfd and must not be reaped with them (its status would be
    lost)."""
    proc = subprocess.Popen([*RUN, "--name", "flat", "--ro-bind", "/", "/", "sh", "-c",
                             "echo ready; exec sleep 600"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(proc.stdout) == "ready\n"
        for status in (7, 0, 3):  # each leaves an orphan that ends at once
            done = subprocess.run([sys.executable, "-m", "bblctl", "exec", "flat", "--", "sh",
                                   "-c", f"(true &); sleep 0.1; exit {status}"], env=env,
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == status, done.stderr
        subprocess.run([sys.executable, "-m", "bblctl", "stop", "flat"], env=env, timeout=30,
                       check=True)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        _end_flat(env, proc)


def test_a_long_runtime_directory_still_holds_the_sockets(env, tmp_path):
    """AF_UNIX paths hold 107 bytes; with a long XDG_RUNTIME_DIR the instances' sockets
    (36 bytes longer) are bound and reached through their directory's fd."""
    long = tmp_path / "run" / ("r" * (86 - len(str(tmp_path / "run")) - 1))
    long.mkdir(mode=0o700)
    env["XDG_RUNTIME_DIR"] = str(long)  # (the fixture ends the daemon this one finds)
    instance_socket = f"{long}/bbl/instances/0123456789abcdef.sock"
    assert len(f"{long}/bbl/bbld.sock") <= 107 < len(instance_socket)
    proc = subprocess.Popen([*RUN, "--ro-bind", "/", "/", "sh", "-c", "echo ready; read x"],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(proc.stdout) == "ready\n"
        ps = subprocess.run([*RUN[:3], "ps", "--json"], env=env, capture_output=True,
                            text=True, timeout=30)
        (entry,) = json.loads(ps.stdout)
        assert entry["state"] == "running", ps.stderr
        proc.stdin.write("go\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_many_runs_share_one_daemon(env):
    procs = [subprocess.Popen([*RUN, "--ro-bind", "/", "/", "sh", "-c", f"exit {i}"], env=env)
             for i in range(5)]
    assert sorted(p.wait(timeout=60) for p in procs) == [0, 1, 2, 3, 4]


def test_die_with_parent_takes_the_sandbox_down_with_the_client(env, marker):
    proc = subprocess.Popen([*RUN, *SYSTEM, "--unshare-pid", "--die-with-parent", "sh", "-c",
                             "echo ready; sleep 1000", marker], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(proc.stdout) == "ready\n"
        sandboxed = processes_with(marker)
        assert sandboxed
        proc.kill()  # SIGKILL: the client cannot clean up
        proc.wait(timeout=10)
        assert wait_gone(sandboxed) == []
    finally:
        proc.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["bwrap", "daemon running", "daemon started by the run"])
def test_die_with_parent_ends_run_and_sandbox_when_the_callers_parent_dies(env, marker, how):
    """bwrap's own parent dies (a shell killed by SIGKILL): bwrap and the sandbox die too.
    The client sets its parent-death signal; its end ends the instance."""
    if how == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("Debian's bubblewrap is missing")
    if how == "daemon running":
        assert bblrun(env, "--ro-bind", "/", "/", "true").returncode == 0
    runner = [shutil.which("bwrap")] if how == "bwrap" else RUN
    shell = subprocess.Popen(
        ["sh", "-c", '"$@"; echo never', "sh", *runner, "--ro-bind", "/", "/",
         "--die-with-parent", "sh", "-c", 'echo "$$"; exec sleep 1000', marker],
        env=env, stdout=subprocess.PIPE, text=True)
    try:
        sleeper = int(read_line(shell.stdout))
        with open(f"/proc/{shell.pid}/task/{shell.pid}/children") as f:
            client = int(f.read().split()[0])
        shell.kill()
        shell.wait(timeout=10)
        assert wait_gone([client, sleeper]) == []
    finally:
        shell.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_monitor_leaves_no_control_socket(env, marker):
    """A monitor killed by SIGKILL cannot remove its instance's control socket: bbld, which
    sees the instance end, removes it when nobody listens there any more."""
    proc = subprocess.Popen([*RUN, *SYSTEM, "--unshare-pid", "sh", "-c", "echo ready; sleep 1000",
                             marker], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    instances = os.path.join(env["XDG_RUNTIME_DIR"], "bbl", "instances")
    try:
        assert read_line(proc.stdout) == "ready\n"
        (socket_name,) = os.listdir(instances)
        (tree,) = json.loads(subprocess.run([*RUN[:3], "tree", "--json"], env=env, text=True,
                                            capture_output=True, timeout=30).stdout)
        with open(f"/proc/{tree['layers'][0]['pid']}/stat") as f:
            monitor = int(f.read().rpartition(")")[2].split()[1])  # layer 1's parent
        os.kill(monitor, signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert wait_until(lambda: not os.listdir(instances)), socket_name
        assert wait_gone(processes_with(marker)) == []
    finally:
        proc.kill()
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def read_available(fd) -> str:
    """What has been written so far (the writer may still hold its end: bwrap's reaper does)."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    os.close(fd)
    return data.decode()


def info_and_status(command: list[str], env=None):
    """Run a command line with --info-fd 3 --json-status-fd 4 (pipes); return both texts."""
    info_r, info_w = os.pipe()
    status_r, status_w = os.pipe()

    def place():
        os.dup2(info_w, 3)
        os.dup2(status_w, 4)

    proc = subprocess.Popen([*command, "--info-fd", "3", "--json-status-fd", "4", *SYSTEM,
                             "--unshare-pid", "--unshare-net", "sh", "-c", "exit 3"],
                            env=env, preexec_fn=place, pass_fds=(3, 4),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(info_w)
    os.close(status_w)
    returncode = proc.wait(timeout=60)
    info, status = read_available(info_r), read_available(status_r)
    # Debian's bwrap 0.8 may leave its pid-1 reaper behind; end it by the pid it reported.
    child = json.loads(info)["child-pid"]
    if os.path.exists(f"/proc/{child}") and "bwrap" in open(f"/proc/{child}/cmdline").read():
        os.kill(child, signal.SIGKILL)
    return returncode, info, status


def shape(text: str) -> str:
    """The format with the numbers taken out."""
    import re

    return re.sub(r"\d+", "N", text)


@pytest.mark.parametrize("how", ["ours", "bwrap"])
@pytest.mark.parametrize("dev", [[], ["--dev", "/dev"]], ids=["plain", "dev"])
def test_a_second_run_joins_the_namespaces_of_info_fds_child_pid(env, how, dev):
    """Tools join a running sandbox through --info-fd's child-pid: they open its
    /proc/PID/ns/user and ns/pid and hand them to --userns and --pidns."""
    if how == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("Debian's bubblewrap is missing")
    if how == "bwrap" and dev:
        pytest.skip("bwrap's child is in the outer user namespace until it makes the nested "
                    "one: what a joiner gets depends on when it looks")
    runner = RUN if how == "ours" else [shutil.which("bwrap")]
    info_r, info_w = os.pipe()
    first = subprocess.Popen([*runner, "--bind", "/", "/", *dev, "--info-fd", "3",
                              "--unshare-user", "--unshare-pid", "--die-with-parent", "sleep",
                              "60"], env=env,
                             pass_fds=(3,), preexec_fn=lambda: os.dup2(info_w, 3))
    os.close(info_w)
    try:
        with os.fdopen(info_r) as info:
            child = json.load(info)["child-pid"]
        if how == "ours":  # (reported before its exec: until then it is a supervisor, not
            # dumpable, whose namespaces nobody else may open)
            assert wait_until(lambda: open(f"/proc/{child}/cmdline").read().startswith("sleep"))
        user = os.open(f"/proc/{child}/ns/user", os.O_RDONLY)
        pid = os.open(f"/proc/{child}/ns/pid", os.O_RDONLY)
        try:
            second = subprocess.run(
                [*runner, "--userns", "11", "--pidns", "12", "--ro-bind", "/", "/",
                 "readlink", "/proc/self/ns/user"], env=env, capture_output=True, text=True,
                timeout=60, pass_fds=(11, 12),
                preexec_fn=lambda: (os.dup2(user, 11), os.dup2(pid, 12)))
        finally:
            os.close(user)
            os.close(pid)
        if dev:  # the command's user namespace is nested (its uid is not 0): the pid
            # namespace belongs to the outer one, which the joiner has no rights in
            assert (second.returncode, second.stderr.splitlines()[:1]) == (
                1, ["bwrap: Setting pidns failed: Operation not permitted"])
        else:
            assert (second.returncode, second.stdout) == (
                0, os.readlink(f"/proc/{child}/ns/user") + "\n"), second.stderr
    finally:
        first.kill()
        first.wait(timeout=30)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="Debian's bubblewrap is missing")
def test_info_fd_and_json_status_fd_have_bubblewraps_format(env):
    ours = info_and_status(RUN, env)
    theirs = info_and_status([shutil.which("bwrap")])
    assert ours[0] == theirs[0] == 3
    assert shape(ours[1]) == shape(theirs[1]), (ours[1], theirs[1])
    assert shape(ours[2]) == shape(theirs[2]), (ours[2], theirs[2])
    assert '"exit-code": 3' in ours[2]


def test_block_fd_holds_the_command_and_sync_fd_closes_at_the_end(env, tmp_path):
    block_r, block_w = os.pipe()
    sync_r, sync_w = os.pipe()
    witness = tmp_path / "ran"

    def place():
        os.dup2(block_r, 5)
        os.dup2(sync_w, 6)

    proc = subprocess.Popen([*RUN, "--block-fd", "5", "--sync-fd", "6", "--ro-bind", "/", "/",
                             "--bind", str(tmp_path), str(tmp_path), "sh", "-c",
                             f"touch {witness}"], env=env, preexec_fn=place, pass_fds=(5, 6))
    os.close(block_r)
    os.close(sync_w)
    try:
        def listed():
            return json.loads(subprocess.run([*RUN[:3], "ps", "--json"], env=env, text=True,
                                             capture_output=True, timeout=30).stdout)

        assert wait_until(listed)  # bbld knows of it (starting: its monitor waits on fd 5)
        assert not witness.exists()  # still blocked
        os.write(block_w, b"x")
        assert proc.wait(timeout=30) == 0 and witness.exists()
        ready, _, _ = select.select([sync_r], [], [], 10)
        assert ready and os.read(sync_r, 1) == b""  # EOF: every holder has closed it
        os.close(sync_r)
    finally:
        proc.kill()
        os.close(block_w)


def both(env, argv, **kw):
    """(ours, Debian bwrap's) results of one command line."""
    theirs = subprocess.run([shutil.which("bwrap"), *argv], capture_output=True, text=True,
                            timeout=60, **kw)
    return bblrun(env, *argv, **kw), theirs


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="Debian's bubblewrap is missing")


def test_overlay_sources_stack_like_bubblewraps_and_resolve_against_the_cwd(env, tmp_path):
    """The last --overlay-src is the top layer; relative sources are found from the working
    directory (bubblewrap realpath()s them; 0.8.0 has no overlays to compare with)."""
    for name, content in (("l1", "1\n"), ("l2", "2\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(content)
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    stacked = bblrun(env, *SYSTEM, "--overlay-src", "l1", "--overlay-src", "l2",
                     "--tmp-overlay", "/mnt", "cat", "/mnt/f", cwd=tmp_path)
    assert (stacked.returncode, stacked.stdout) == (0, "2\n"), stacked.stderr
    written = bblrun(env, *SYSTEM, "--overlay-src", f"../{tmp_path.name}/l1", "--overlay",
                     "u", "./w", "/mnt", "sh", "-c", "cat /mnt/f; echo 3 > /mnt/f",
                     cwd=tmp_path)
    assert (written.returncode, written.stdout) == (0, "1\n"), written.stderr
    assert (tmp_path / "u" / "f").read_text() == "3\n"


def test_no_mount_point_is_made_inside_a_bound_host_directory(env, tmp_path):
    """bubblewrap would create /HOST/new on the host; bbl-bwrap refuses (exit 1, its
    status for every failure) and leaves the host directory as it was."""
    result = bblrun(env, "--bind", "/", "/", "--tmpfs", f"{tmp_path}/new/mnt", "true")
    assert result.returncode == 1
    assert result.stderr == (
        f"bwrap: fs[1] (tmpfs) {tmp_path}/new/mnt: cannot create {tmp_path}/new: its parent "
        "is not on a filesystem this layer created (a bind of a host directory, or a layer "
        "without new_root), and creating it there would write to the host; create it on the "
        "host first, or mount elsewhere\n")
    assert sorted(os.listdir(tmp_path)) == ["run", "state"]  # (the private daemon's)


@needs_bwrap
def test_relative_bind_sources_are_found_from_the_working_directory(env, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("found\n")
    argv = [*SYSTEM, "--ro-bind", "d", "/mnt", "--bind", f"../{tmp_path.name}/d/f", "/f",
            "--bind-try", "missing", "/opt", "cat", "/mnt/f", "/f"]
    ours, theirs = both(env, argv, cwd=tmp_path)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (
        0, "found\nfound\n"), (ours.stderr, theirs.stderr)


@needs_bwrap
def test_as_pid_1_runs_the_command_as_pid_1(env):
    # the shell's own glob lists the pid namespace's processes without a fork (`ls | grep`
    # raced: ls could read /proc before the shell had forked grep)
    ours, theirs = both(env, [*SYSTEM, "--unshare-pid", "--as-pid-1", "sh", "-c",
                              "echo $$; echo /proc/[0-9]*; exit 5"])
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (
        5, "1\n/proc/1\n")
    plain = bblrun(env, *SYSTEM, "--unshare-pid", "sh", "-c", "echo $$")
    assert plain.stdout != "1\n"  # without it a supervisor is pid 1
    missing = bblrun(env, *SYSTEM, "--unshare-pid", "--as-pid-1", "/no/such")
    assert (missing.returncode, missing.stderr) == (
        1, "bwrap: execvp /no/such: No such file or directory\n")


@needs_bwrap
@pytest.mark.parametrize("dev", [[], ["--dev", "/dev"]], ids=["one layer", "with --dev"])
def test_pid_numbers_match_bubblewrap(env, dev):
    """With --unshare-pid: pid 1 reaps (bwrap's init, our supervisor), the command is 2, also
    with --dev, where our command's layer (the uid switch) has no supervisor of its own."""
    ours, theirs = both(env, [*SYSTEM[:-4], "--proc", "/proc", *dev, "--unshare-pid",
                              "--unshare-user", "sh", "-c", "echo $$ $PPID"])
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (0, "2 1\n")


def test_lock_file_is_read_locked_while_the_sandbox_runs(env, tmp_path):
    import fcntl

    lock = tmp_path / "lock"
    lock.write_text("")
    proc = subprocess.Popen([*RUN, "--ro-bind", "/", "/", "--lock-file", str(lock), "sh", "-c",
                             "echo ready; read x"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert read_line(proc.stdout) == "ready\n"
        with open(lock, "r+") as f:
            with pytest.raises(BlockingIOError):
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a read lock is held
            proc.communicate("go\n", timeout=30)
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the sandbox
        assert proc.returncode == 0
    finally:
        proc.kill()
    missing = bblrun(env, "--ro-bind", "/", "/", "--lock-file", "/no/lock", "true")
    assert (missing.returncode, missing.stderr) == (
        1, "bwrap: lock_files: /no/lock: No such file or directory\n")


@needs_bwrap
def test_disable_userns_cannot_be_undone_from_inside(env):
    """Even with every capability the command cannot raise the limit back."""
    script = ("echo 100 > /proc/sys/user/max_user_namespaces 2>/dev/null; "
              "unshare -U true 2>/dev/null && echo created || echo denied")
    argv = [*SYSTEM, "--unshare-user", "--unshare-pid", "--proc", "/proc", "--cap-add", "ALL",
            "--disable-userns", "sh", "-c", script]
    ours, theirs = both(env, argv)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (0, "denied\n")
    allowed = bblrun(env, *SYSTEM, "--unshare-user", "sh", "-c", script)
    assert allowed.stdout == "created\n"  # the probe can tell


@needs_bwrap
def test_assert_userns_disabled(env):
    ours, theirs = both(env, [*SYSTEM, "--assert-userns-disabled", "true"])
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr) == (
        1, "bwrap: creation of new user namespaces was not disabled as requested\n")
    ours, theirs = both(env, [*SYSTEM, "--unshare-user", "--disable-userns",
                              "--assert-userns-disabled", "echo", "ok"])
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (0, "ok\n")


@pytest.fixture
def namespace_holder(marker):
    """A process in its own user (root-mapped) and pid namespaces; yields its pid."""
    proc = subprocess.Popen(["unshare", "-U", "-r", "-p", "--fork", "sh", "-c", "sleep 600",
                             marker])
    try:
        ours = os.readlink("/proc/self/ns/pid")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            inside = [pid for pid in processes_with(marker)
                      if _readlink(f"/proc/{pid}/ns/pid") not in (ours, None)]
            if inside:
                break
            time.sleep(0.02)
        holder = inside[0]
        yield holder
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for pid in processes_with(marker):
            os.kill(pid, signal.SIGKILL)


def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


@needs_bwrap
def test_userns_and_pidns_join_existing_namespaces(env, namespace_holder):
    user = os.open(f"/proc/{namespace_holder}/ns/user", os.O_RDONLY)
    pid = os.open(f"/proc/{namespace_holder}/ns/pid", os.O_RDONLY)

    def place():  # in the child only: fds 5 and 6 of this process are pytest's
        os.dup2(user, 5)
        os.dup2(pid, 6)

    try:
        script = "id -u; readlink /proc/self/ns/user; echo $$"
        for extra in ([], ["--unshare-pid"]):
            ours, theirs = both(env, [*SYSTEM, "--userns", "5", "--pidns", "6", *extra,
                                      "sh", "-c", script], preexec_fn=place, pass_fds=(5, 6))
            expected = os.readlink(f"/proc/{namespace_holder}/ns/user")
            assert ours.returncode == theirs.returncode == 0, ours.stderr
            assert ours.stdout.splitlines()[:2] == theirs.stdout.splitlines()[:2] == [
                "0", expected]
            assert ours.stdout.splitlines()[2] != "1"  # born in the joined pid namespace
        wrong, theirs = both(env, [*SYSTEM, "--userns", "6", "true"], preexec_fn=place,
                             pass_fds=(5, 6))  # (a pid namespace's fd)
        assert (wrong.returncode, wrong.stderr) == (theirs.returncode, theirs.stderr) == (
            1, "bwrap: Joining the specified user namespace failed, it might not be a "
               "descendant of the current user namespace.\n")
    finally:
        os.close(user)
        os.close(pid)


def test_userns_block_fd_lets_someone_else_write_the_maps(env):
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()

    def place():
        os.dup2(info_w, 5)
        os.dup2(block_r, 6)

    proc = subprocess.Popen([*RUN, "--unshare-user", "--userns-block-fd", "6", "--info-fd", "5",
                             *SYSTEM, "sh", "-c", "id -u; cat /proc/self/uid_map"],
                            env=env, preexec_fn=place, pass_fds=(5, 6),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(info_w)
    os.close(block_r)
    try:
        assert select.select([info_r], [], [], 30)[0]
        child = json.loads(read_available(info_r))["child-pid"]
        uid, gid = os.getuid(), os.getgid()
        for name, text in (("setgroups", "deny"), ("uid_map", f"4242 {uid} 1"),
                           ("gid_map", f"4242 {gid} 1")):
            with open(f"/proc/{child}/{name}", "w") as f:
                f.write(text)
        os.write(block_w, b"x")
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        os.close(block_w)
    assert proc.returncode == 0, err
    assert out.split()[:3] == ["4242", "4242", str(uid)]


# ---------------------------------------------------------------- the option matrix

HOST_NS = {name: os.readlink(f"/proc/self/ns/{name}")
           for name in ("user", "mnt", "ipc", "net", "uts", "cgroup", "pid")}
NS_SCRIPT = "; ".join(f'[ "$(readlink /proc/self/ns/{name})" = "{link}" ] && echo {name}=host '
                      f'|| echo {name}=new' for name, link in HOST_NS.items())
ALLOW_ALL = b"\x06\0\0\0\0\0\xff\x7f"  # one BPF instruction: return SECCOMP_RET_ALLOW
# (options, script, fds: {number: bytes or "tmp" for a directory}, expected stdout or None)
MATRIX = [
    ([], NS_SCRIPT, {}, None),
    *[([option], NS_SCRIPT, {}, None) for option in (
        "--unshare-user", "--unshare-user-try", "--unshare-ipc", "--unshare-pid",
        "--unshare-net", "--unshare-uts", "--unshare-cgroup", "--unshare-cgroup-try",
        "--unshare-all")],
    (["--unshare-all", "--share-net"], NS_SCRIPT, {}, None),
    (["--unshare-user", "--uid", "0", "--gid", "0"], "id -u; id -g", {}, "0\n0\n"),
    (["--unshare-user", "--uid", "1234"], "id -u", {}, "1234\n"),
    (["--unshare-uts", "--hostname", "h"], "hostname", {}, "h\n"),
    (["--chdir", "/usr/bin"], "pwd", {}, "/usr/bin\n"),
    (["--setenv", "A", "1", "--unsetenv", "HOME"], 'echo "$A ${HOME-unset}"', {}, "1 unset\n"),
    (["--clearenv", "--setenv", "B", "2"], "env | grep -v ^PWD= | sort", {}, "B=2\n"),
    (["--bind", "{tmp}", "/mnt"], "touch /mnt/x && echo written", {}, "written\n"),
    (["--bind-try", "/nonexistent", "/mnt"], "echo ok", {}, "ok\n"),
    (["--dev-bind", "/dev/null", "/null2"], "echo x > /null2 && echo ok", {}, "ok\n"),
    (["--dev-bind-try", "/nonexistent", "/x"], "echo ok", {}, "ok\n"),
    (["--ro-bind", "{tmp}", "/mnt"], "touch /mnt/y 2>/dev/null || echo ro", {}, "ro\n"),
    (["--ro-bind-try", "/nonexistent", "/x"], "[ -e /x ] || echo absent", {}, "absent\n"),
    (["--bind", "{tmp}", "/mnt", "--remount-ro", "/mnt"], "touch /mnt/z 2>/dev/null || echo ro",
     {}, "ro\n"),
    (["--perms", "0700", "--tmpfs", "/tmp"], "stat -c %a /tmp", {}, "700\n"),
    (["--size", "65536", "--tmpfs", "/tmp"], "df -k /tmp | tail -1 | tr -s ' ' | cut -d' ' -f2", {},
     "64\n"),
    (["--unshare-ipc", "--mqueue", "/mq"], "stat -f -c %T /mq", {}, "mqueue\n"),
    # mountinfo's type and source of each new mount, and --dev's /dev/shm (a plain directory)
    (["--unshare-ipc", "--mqueue", "/mq", "--tmpfs", "/tmp"],
     "sed -E 's/^([^ ]+ ){4}([^ ]+) .* - ([^ ]+) ([^ ]+) .*/\\2 \\3 \\4/' /proc/self/mountinfo"
     " | grep -v -e ^/usr -e devtmpfs; stat -c '%a %F' /dev/shm", {},
     "/ tmpfs tmpfs\n/proc proc proc\n/dev tmpfs tmpfs\n/dev/pts devpts devpts\n"
     "/mq mqueue mqueue\n/tmp tmpfs tmpfs\n755 directory\n"),
    (["--dir", "/d", "--perms", "0711", "--dir", "/d2"], "stat -c %a /d /d2", {}, "755\n711\n"),
    (["--dir", "/d", "--chmod", "0750", "/d"], "stat -c %a /d", {}, "750\n"),
    # created parents: 0755 less what the operation's perms give neither group nor others
    (["--tmpfs", "/mnt", "--bind", "/usr/bin", "/mnt/a/b", "--symlink", "x", "/mnt/s/l",
      "--dir", "/mnt/d/e", "--perms", "0750", "--dir", "/mnt/q/d", "--bind-data", "5",
      "/mnt/t/f", "--perms", "0604", "--file", "6", "/mnt/o/f", "--perms", "0700", "--tmpfs",
      "/mnt/n/x"], "cd /mnt && stat -c %a a s d q t o n", {5: b"", 6: b""},
     "700\n700\n755\n750\n700\n705\n700\n"),
    (["--symlink", "usr/bin", "/bin2"], "readlink /bin2", {}, "usr/bin\n"),
    (["--file", "5", "/f"], "cat /f", {5: b"in a file\n"}, "in a file\n"),
    (["--bind-data", "5", "/f"], "cat /f", {5: b"bound\n"}, "bound\n"),
    (["--ro-bind-data", "5", "/f"], "cat /f; echo x >> /f 2>/dev/null || echo ro",
     {5: b"data\n"}, "data\nro\n"),
    (["--bind-fd", "5", "/mnt"], "touch /mnt/viafd && echo ok", {5: "tmp"}, "ok\n"),
    (["--ro-bind-fd", "5", "/mnt"], "touch /mnt/no 2>/dev/null || echo ro", {5: "tmp"},
     "ro\n"),
    (["--seccomp", "5"], "grep ^Seccomp: /proc/self/status", {5: ALLOW_ALL}, "Seccomp:\t2\n"),
    (["--add-seccomp-fd", "5"], "grep ^Seccomp: /proc/self/status", {5: ALLOW_ALL},
     "Seccomp:\t2\n"),
    (["--args", "5"], "echo $X", {5: b"--setenv\0X\0from-args\0"}, "from-args\n"),
    (["--cap-add", "CAP_NET_ADMIN"], "grep ^CapEff: /proc/self/status", {},
     "CapEff:\t0000000000001000\n"),
    (["--cap-add", "ALL", "--cap-drop", "ALL"], "grep ^CapEff: /proc/self/status", {},
     "CapEff:\t0000000000000000\n"),
    (["--new-session"], 'read -r a b c d e sid rest </proc/self/stat; [ "$sid" = "$$" ] '
     '&& echo leader', {}, None),
    (["--die-with-parent"], "echo ok", {}, "ok\n"),
    (["--unshare-pid", "--as-pid-1"], "echo $$", {}, "1\n"),
    (["--lock-file", "/usr"], "echo ok", {}, "ok\n"),
    (["--unshare-user", "--disable-userns"], "unshare -U true 2>/dev/null || echo denied", {},
     "denied\n"),
    (["--argv0", "renamed"], "echo $0", {}, "renamed\n"),
    (["--level-prefix"], "echo ok", {}, "ok\n"),
    (["--overlay-src", "/usr", "--tmp-overlay", "/usr"], "touch /usr/new && echo ok", {},
     "ok\n"),
    (["--exec-label", "x"], "echo ok", {}, None),
    (["--file-label", "x"], "echo ok", {}, None),
]


def run_with(command: list[str], fds: dict, tmp_path, env=None):
    """Run with the matrix's fds: data through pipes, "tmp" as an O_PATH fd of tmp_path."""
    opened = {}
    for number, what in fds.items():
        if what == "tmp":
            opened[number] = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
        else:
            r, w = os.pipe()
            os.write(w, what)
            os.close(w)
            opened[number] = r

    def place():
        for number, fd in opened.items():
            os.dup2(fd, number)

    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                              preexec_fn=place, pass_fds=tuple(fds))
    finally:
        for fd in opened.values():
            os.close(fd)


@needs_bwrap
@pytest.mark.parametrize("options, fds", [
    (["--add-seccomp-fd", "10", "--seccomp", "11"], {10: b"", 11: b""}),
    (["--seccomp", "10", "--add-seccomp-fd", "11"], {10: b"", 11: b""}),
    (["--add-seccomp-fd", "10", "--add-seccomp-fd", "10"], {10: b""}),  # read, closed: EBADF
    (["--add-seccomp-fd", "10", "--foo"], {10: b"1234567"}),  # read while parsing
    (["--add-seccomp-fd", "10"], {10: b""}),  # empty: refused by the kernel, when loaded
    (["--seccomp", "10"], {10: b""}),
    (["--seccomp", "10"], {10: b"1234567"}),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_seccomp_data_is_refused_in_bubblewraps_words(env, tmp_path, options, fds):
    argv = ["--ro-bind", "/", "/", *options, "true"]
    theirs = run_with([shutil.which("bwrap"), *argv], fds, tmp_path)
    assert theirs.returncode == 1
    alone = run_with([*RUN, *argv], fds, tmp_path, env)  # (no bbld yet: the client parses)
    assert bblrun(env, "--ro-bind", "/", "/", "true").returncode == 0
    through_bbld = run_with([*RUN, *argv], fds, tmp_path, env)  # the monitor parses
    for ours in (alone, through_bbld):
        assert (ours.returncode, ours.stderr) == (1, theirs.stderr)


@pytest.mark.parametrize("options, script, fds, expected", MATRIX,
                         ids=[" ".join(m[0]) or "none" for m in MATRIX])
def test_option_matrix_against_bubblewrap(env, tmp_path, options, script, fds, expected):
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    argv = [*SYSTEM, *options, "sh", "-c", script]
    ours = run_with([*RUN, *argv], fds, tmp_path, env)
    if expected is not None:
        assert (ours.returncode, ours.stdout) == (0, expected), ours.stderr
    if shutil.which("bwrap") is None:
        return
    theirs = run_with([shutil.which("bwrap"), *argv], fds, tmp_path)
    if "Unknown option" in theirs.stderr:
        return  # newer than Debian's bubblewrap 0.8.0: checked against `expected` only
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), (
        ours.stderr, theirs.stderr)


@pytest.mark.parametrize("daemon", [False, True], ids=["daemon started by the run",
                                                       "daemon running"])
def test_an_interactive_shell_gets_job_control_on_a_pty_of_the_sandboxs_own(env, daemon):
    """On a terminal, without --new-session, bubblewrap leaves the command the caller's
    terminal: an interactive shell has job control. Here the shell gets a pty from the
    sandbox's own devpts (the host terminal stays out of reach), with the same keys."""
    if daemon:
        assert bblrun(env, "--ro-bind", "/", "/", "true").returncode == 0

    session = Session(["run", *SYSTEM, "--unshare-pid", "bash", "--norc", "--noprofile", "-i"],
                      env)
    try:
        session.expect("$ ")
        session.send("tty; echo flags $-\r")
        out = session.expect("$ ")
        assert "/dev/pts/0" in out and re.search(r"flags \w*m", out), out  # m: job control
        session.send("sleep 6143\r")
        assert wait_until(lambda: processes_with("sleep\x006143"))
        session.send("\x1a")  # Ctrl-Z: the job stops, the shell takes the terminal back
        assert "Stopped" in session.expect("$ ")
        session.send("kill -9 %1; sleep 6144\r")
        assert wait_until(lambda: processes_with("sleep\x006144"))
        session.interrupt_and_exit(6)  # Ctrl-C reaches the sandbox's foreground job
    finally:
        session.close()


@pytest.mark.parametrize("options", [["--new-session"], ["--unshare-pid", "--as-pid-1"]])
def test_without_a_pty_the_command_has_no_terminal_at_all(env, options):
    """--new-session (bubblewrap's own answer to TIOCSTI) and --as-pid-1 keep the plain
    way: a session of its own without a controlling terminal."""
    session = Session(["run", *SYSTEM, *options, "sh", "-c",
                       'read -r pid comm state ppid pgrp sid tty rest </proc/self/stat; '
                       'echo "controlling terminal $tty"'], env)
    try:
        assert "controlling terminal 0\r\n" in session.expect("\n")
        assert session.proc.wait(timeout=30) == 0
    finally:
        session.close()
