"""BBL's benchmarks, side by side with bubblewrap measured in the same run.

    bash tests/bench/run.sh [ROUNDS]      (as root: runs as the unprivileged test account)
    python -m tests.bench.bench [ROUNDS]  (as an unprivileged user, from the source tree)

Prints a table of medians (and min/max) in milliseconds or MB. Not part of the test suite.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PY = sys.executable


def _script(name: str, module: str) -> list[str]:
    """The installed script, as users run it (tests/bench/run.sh installs one); else -m."""
    path = os.path.join(os.path.dirname(PY), name)
    return [path] if os.path.exists(path) else [PY, "-m", module]


BBLCTL = _script("bblctl", "bblctl")
BBL_BWRAP = _script("bbl-bwrap", "bblctl.run")
BWRAP = shutil.which("bwrap")
FLATPAK_LIKE = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink",
                "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "--proc", "/proc",
                "--dev", "/dev", "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent",
                "--new-session", "true"]
rows: list[tuple[str, str, list[float]]] = []


def timed(argv, rounds, **kw) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        # no timeout: Popen.wait(timeout) polls with sleeps of up to 50 ms, which would be
        # measured too
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
        times.append((time.perf_counter() - start) * 1000)
    return times


def row(name: str, unit: str, values: list[float]) -> None:
    rows.append((name, unit, values))
    print(f"  measured: {name}", file=sys.stderr)


def ctl(*argv, **kw) -> str:
    return subprocess.run([*BBLCTL, *argv], check=True, capture_output=True, text=True,
                          **kw).stdout


def profile(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def startup(rounds: int, work: str) -> None:
    row("python3 -c pass", "ms", timed([PY, "-c", "pass"], rounds))
    if BWRAP:
        row("bwrap --ro-bind / / true", "ms", timed([BWRAP, "--ro-bind", "/", "/", "true"],
                                                    rounds))
    ctl("ps")  # the daemon runs: measure what each start costs, not the daemon's own start
    row("bblctl run --ro-bind / / true", "ms",
        timed([*BBLCTL, "run", "--ro-bind", "/", "/", "true"], rounds))
    if BWRAP:
        row("bwrap, Flatpak-like", "ms", timed([BWRAP, *FLATPAK_LIKE], rounds))
    row("bbl-bwrap, Flatpak-like", "ms", timed([*BBL_BWRAP, *FLATPAK_LIKE], rounds))
    exits = profile(work, "exits", 'command = ["true"]\n')
    row("template: start -> exit", "ms", timed([*BBLCTL, "start", exits], rounds,
                                                stdin=subprocess.DEVNULL))
    stamp = profile(work, "stamp", 'command = ["date", "+%s%N"]\n')
    to_command = []
    for _ in range(rounds):
        start = time.time_ns()
        out = ctl("start", stamp, stdin=subprocess.DEVNULL)
        to_command.append((int(out) - start) / 1e6)
    row("template: start -> command in layer4", "ms", to_command)
    if shutil.which("pasta") and os.access("/dev/net/tun", os.W_OK):  # (docs/profiles.md)
        for name, text in (("nat", 'net = "nat"\n'),
                           ("nat + rate", '[net]\nrate = "100mbit"\n')):
            nat = profile(work, name.replace(" + ", "-"), f'command = ["true"]\n{text}')
            row(f"template, {name}: start -> exit", "ms",
                timed([*BBLCTL, "start", nat], rounds, stdin=subprocess.DEVNULL))


def running_instance(rounds: int, work: str) -> None:
    idle = profile(work, "idle", 'command = ["sleep", "3600"]\nsend_args = ["true"]\n')
    instance = ctl("start", idle, "--detach").strip()
    try:
        time.sleep(0.5)
        row("bblctl exec ID -- true", "ms", timed([*BBLCTL, "exec", instance, "--", "true"],
                                                 rounds))
        row("bblctl send-args ID -- x", "ms", timed([*BBLCTL, "send-args", instance, "x"],
                                                   rounds))
        row("bblctl attach ID -- true", "ms", timed([*BBLCTL, "attach", instance, "--", "true"],
                                                   rounds))
        (entry,) = [e for e in json.loads(ctl("ps", "--json")) if e["id"] == instance]
        memory, kind = instance_memory(instance)
        row(f"idle template instance, {kind}", "MB", [memory])
        row(f"bbld + forker + spare monitor, {kind}", "MB", [daemon_memory()[0]])
    finally:
        ctl("stop", instance, "--timeout", "1")


def instance_processes(instance: str) -> list[int]:
    (tree,) = json.loads(ctl("tree", instance, "--json"))
    pids, stack = [], list(tree["layers"])
    while stack:
        node = stack.pop()
        if node["pid"]:
            pids.append(node["pid"])
        pids += [p["pid"] for p in node["processes"]]
        stack += node["children"]
    monitor = _parent(pids[0]) if pids else None
    return pids + ([monitor] if monitor else [])


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except OSError:
        return None


def memory_of(pids: list[int]) -> tuple[float, str]:
    """PSS in MB where smaps_rollup is readable (root, or dumpable processes) or where root
    reads it for us (tests/bench/run.sh), else RSS."""
    try:
        total = sum(_field(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids)
        return total / 1024, "PSS"
    except OSError:
        pass
    helper = os.environ.get("BBL_BENCH_PSS")  # a directory with root's ask/answer FIFOs
    if helper:
        with open(os.path.join(helper, "ask"), "w") as ask:
            ask.write(" ".join(map(str, pids)) + "\n")
        with open(os.path.join(helper, "answer")) as answer:
            return int(answer.read()) / 1024, "PSS (read by root)"
    return sum(_field(f"/proc/{pid}/status", "VmRSS:") for pid in pids) / 1024, \
        "RSS (PSS needs root: supervisors are not dumpable)"


def _field(path: str, key: str) -> int:
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def instance_memory(instance: str) -> tuple[float, str]:
    return memory_of(instance_processes(instance))


def daemon_memory() -> tuple[float, str]:
    pid = json.loads(subprocess.run(
        [PY, "-c", "import json; from bblctl.client import connect; "
                   "print(json.dumps(connect().call('io.bbl.Manager.Ping')['pid']))"],
        capture_output=True, text=True, check=True).stdout)
    forker = _children(pid)[:1]
    # and the forker's spare monitor: its one child without children (monitors have layer 1)
    spare = [child for child in _children(forker[0]) if not _children(child)] if forker else []
    return memory_of([pid, *forker, *spare])


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def scale(work: str, count: int) -> None:
    idle = profile(work, "many", 'command = ["sleep", "3600"]\nnet = "host"\n')
    before = _field(f"/proc/{daemon_pid()}/status", "VmRSS:")
    started = []
    try:
        procs = [subprocess.Popen([*BBLCTL, "start", idle, "--detach"], stdout=subprocess.PIPE,
                                  text=True) for _ in range(50)]
        outcomes = [p.communicate(timeout=300) for p in procs]
        ok = [out.strip() for (out, _), p in zip(outcomes, procs, strict=True)
              if p.returncode == 0]
        started += ok
        row("50 parallel starts: succeeded", "count", [len(ok)])
        while len(started) < count:
            result = subprocess.run([*BBLCTL, "start", idle, "--detach"], capture_output=True,
                                    text=True, timeout=120)
            if result.returncode != 0:
                print(f"  start {len(started) + 1} failed: {result.stderr.strip()}",
                      file=sys.stderr)
                break
            started.append(result.stdout.strip())
        row(f"bblctl ps with {len(started)} instances", "ms", timed([*BBLCTL, "ps"], 11))
        after = _field(f"/proc/{daemon_pid()}/status", "VmRSS:")
        row("bbld RSS growth per instance", "KB", [(after - before) / len(started)])
    finally:
        for instance in started:
            subprocess.run([*BBLCTL, "stop", instance, "--timeout", "0"], capture_output=True)


def daemon_pid() -> int:
    return int(subprocess.run([PY, "-c", "from bblctl.client import connect; "
                               "print(connect().call('io.bbl.Manager.Ping')['pid'])"],
                              capture_output=True, text=True, check=True).stdout)


def run_spec(conn, sandbox: dict) -> float:
    """Milliseconds from a Run call to the end of its instance (an already running client)."""
    from bblctl.wire import dumps

    cwd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    start = time.perf_counter()
    try:
        for reply in conn.stream("io.bbl.Manager.Run", fds=(0, 1, 2, cwd), spec=dumps(sandbox),
                                 args=[], env={"PATH": "/usr/bin:/bin"}):
            if reply.get("event") == "exited":
                assert reply["status"] == 0, reply
    finally:
        os.close(cwd)
    return (time.perf_counter() - start) * 1000


def nested(depth: int) -> dict:
    """`depth` layers, each with its own user, mount and pid namespaces; true in the last."""
    layer = {"name": f"l{depth}", "namespaces": ["user", "mount", "pid"],
             "command": {"argv": ["true"]}}
    for level in range(depth - 1, 0, -1):
        layer = {"name": f"l{level}", "namespaces": ["user", "mount", "pid"],
                 "layers": [layer]}
    return {"name": "depth", "layer": layer}


def binds(count: int) -> dict:
    """One layer on a new root: /usr read-only, then `count` more binds of /usr/bin."""
    fs = [{"op": "ro-bind", "src": "/usr", "dest": "/usr"},
          {"op": "symlink", "target": "usr/bin", "dest": "/bin"},
          {"op": "symlink", "target": "usr/lib", "dest": "/lib"},
          {"op": "symlink", "target": "usr/lib64", "dest": "/lib64"}]
    fs += [{"op": "ro-bind", "src": "/usr/bin", "dest": f"/b/{i}"} for i in range(count)]
    return {"name": "binds", "layer": {"name": "l1", "namespaces": ["user", "mount"],
                                        "new_root": True, "fs": fs,
                                        "command": {"argv": ["true"]}}}


def scaling(rounds: int) -> None:
    """How start-to-exit grows with layer depth and with filesystem operations."""
    from bblctl.client import connect

    with connect() as conn:
        for depth in (1, 2, 4, 8, 16):
            row(f"depth {depth}: Run -> exit", "ms",
                [run_spec(conn, nested(depth)) for _ in range(rounds)])
        for count in (10, 100, 1000):
            row(f"{count} binds: Run -> exit", "ms",
                [run_spec(conn, binds(count)) for _ in range(max(3, rounds // 3))])


def import_time() -> None:
    """What importing the client's everyday modules costs, beyond the interpreter's start."""
    modules = ("bblctl.__main__", "bblctl.run", "bblctl.enter", "bblctl.manage")
    # from / : the installed package, not the source tree the benchmark runs from
    out = subprocess.run([PY, "-X", "importtime", "-c", f"import {', '.join(modules)}"],
                         capture_output=True, text=True, cwd="/").stderr
    total = 0
    for line in out.splitlines():  # "import time: SELF | CUMULATIVE | NAME", top level only
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[2].strip() in modules and fields[2][1] != " ":
            total += int(fields[1])
    row("client imports (python -X importtime)", "ms", [total / 1000])


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    if os.getuid() == 0:
        print("run the benchmarks as an unprivileged user (bash tests/bench/run.sh does)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as work:
        run = os.path.join(work, "run")
        os.mkdir(run, 0o700)
        os.environ.update(XDG_RUNTIME_DIR=run, XDG_STATE_HOME=os.path.join(work, "state"))
        try:
            startup(rounds, work)
            running_instance(rounds, work)
            scale(work, 200)
            scaling(rounds)
            import_time()
        finally:
            subprocess.run([PY, "-c", "import os, signal; from bblctl.client import connect\n"
                            "os.kill(connect(autostart=False).call('io.bbl.Manager.Ping')"
                            "['pid'], signal.SIGTERM)"], capture_output=True)
    print(f"\n{'benchmark':45} {'unit':6} {'median':>9} {'min':>9} {'max':>9}")
    for name, unit, values in rows:
        print(f"{name:45} {unit:6} {statistics.median(values):9.1f} {min(values):9.1f} "
              f"{max(values):9.1f}")
    print(f"\n{len(rows)} rows, {rounds} rounds each where timed; {os.cpu_count()} cores; "
          f"{os.uname().release}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
