"""`bblctl daemon status [--json]` and `bblctl daemon stop`: the daemon itself."""

import os
import select
import sys
import time

from bblctl.cli import UsageError, parse
from bblctl.client import ClientError, running_daemon
from bbld import paths

NOT_RUNNING = 3  # as `systemctl status` says of a unit that is not active


def daemon(argv: list[str]) -> int:
    if not argv or argv[0] not in ("status", "stop"):
        raise UsageError("use `bblctl daemon status [--json]` or `bblctl daemon stop`")
    flags, _, positional = parse(argv[1:], {"--json": False}, {})
    if positional:
        raise UsageError(f"daemon {argv[0]} takes no arguments (got {positional[0]!r})")
    return status(flags["--json"]) if argv[0] == "status" else stop()


def status(as_json: bool) -> int:
    """Whether bbld runs, and what it says of itself; exit status 3 when it does not run."""
    conn = running_daemon()
    if conn is None:
        facts = {"running": False, "socket": paths.socket_path(),
                 "runtime": paths.runtime_dir()}
    else:
        with conn:
            facts = {"running": True, **conn.call("io.bbl.Manager.Status")}
    if as_json:
        import json  # (only for --json)

        print(json.dumps(facts, indent=2))
    elif not facts["running"]:
        print(f"bbld: not running (its socket would be {facts['socket']}; a bblctl command "
              "that needs it starts it)")
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(facts["started"]))
        for key, value in (("pid", facts["pid"]), ("version", facts["version"]),
                           ("started", f"{started} ({facts['started_by']})"),
                           ("socket", facts["socket"]), ("runtime", facts["runtime"]),
                           ("instances", f"{facts['instances']} running, {facts['ended']} ended "
                                         f"(remembered), {facts['watchers']} watching")):
            print(f"{key:10} {value}")
    return 0 if facts["running"] else NOT_RUNNING


def stop() -> int:
    """End bbld; its instances run on, and the next bbld adopts them."""
    conn = running_daemon()
    if conn is None:
        print("bbld: not running")
        return 0
    with conn:
        facts = conn.call("io.bbl.Manager.Status")
        try:
            pidfd = os.pidfd_open(facts["pid"])
        except OSError:
            pidfd = None  # (in another pid namespace: then we only trust its word)
        conn.call("io.bbl.Manager.Quit")
    if pidfd is not None:
        try:
            if not select.select([pidfd], [], [], 10)[0]:
                raise ClientError(f"bbld (pid {facts['pid']}) did not end within 10 s")
        finally:
            os.close(pidfd)
    running = facts["instances"]
    print(f"bbld (pid {facts['pid']}) stopped; " + (
        f"its {running} instance{'s' if running != 1 else ''} run on and the next bbld "
        "adopts them" if running else "no instance was running"), file=sys.stdout)
    return 0
