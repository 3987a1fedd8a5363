"""`bblctl ps`, `tree`, `stop` and `kill`: looking at and ending running instances."""

import os
import sys
import time

from bblctl.cli import UsageError, parse, printable
from bblctl.client import connect


def signal_number(text: str) -> int:
    """9, KILL, SIGKILL, sigkill -> 9 (0: none, to ask whether it runs)."""
    if text.isdigit() and 0 <= int(text) <= 64:
        return int(text)
    import signal  # (its enum costs milliseconds: only for names)

    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise UsageError(f"unknown signal {text!r}; use a name like TERM or a number") from None


# ---------------------------------------------------------------- ps


def ps(argv: list[str]) -> int:
    flags, _, positional = parse(argv, {"--json": False, "--all": False, "--watch": False}, {})
    if positional:
        raise UsageError(f"ps takes no arguments (got {positional[0]!r})")
    if flags["--watch"]:
        return _watch(flags["--json"])
    with connect() as conn:
        instances = conn.call("io.bbl.Manager.List", all=flags["--all"],
                              brief=True)["instances"]
    rows = [_ps_row(entry) for entry in instances]
    if flags["--json"]:
        _print_json(rows)
        return 0
    table = [["ID", "NAME", "STATE", "STARTED", "PID", "LAYERS", "MEM", "COMMAND"]]
    for row in rows:
        state = row["state"] if row["status"] is None else f"{row['state']} ({row['status']})"
        if row["cause"]:
            state = f"{state[:-1]}: {row['cause']})"
        table.append([printable(row["id"]), printable(row["name"]), state,
                      row["started"][:19].replace("T", " "), str(row["pid"] or "-"),
                      str(row["layers"]), _size(row["usage"].get("memory")),
                      _command(row["command"])])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)]
        print("  ".join([*cells, line[-1]]))
    return 0


def _watch(as_json: bool) -> int:
    """The running instances first ("running" lines), then instances starting and ending as
    it happens, a line each (JSON lines with --json), until Ctrl-C."""
    try:
        with connect() as conn:
            running = conn.call("io.bbl.Manager.List", brief=True)["instances"]
            for entry in running:
                _say_event({"event": "running", "id": entry["id"], "name": entry["name"],
                            "time": entry["started"]}, as_json)
            for event in conn.stream("io.bbl.Manager.Events"):
                _say_event(event, as_json)
    except KeyboardInterrupt:
        return 130
    return 0


def _say_event(event: dict, as_json: bool) -> None:
    if as_json:
        _print_json(event, indent=None)
        return
    when = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    status = f" status {event['status']}" if event["event"] == "exited" else ""
    print(printable(f"{when} {event['event']} {event['id']} {event['name']}{status}"),
          flush=True)


def _command(argv: list[str]) -> str:
    """An argv to show: each word printable (a process inside a sandbox names itself)."""
    return " ".join(printable(word) for word in argv)


def _print_json(value, indent: int | None = 2) -> None:
    import json  # only for --json: plain output stays light

    print(json.dumps(value, indent=indent), flush=True)


def _local_time(seconds: float) -> str:
    """ISO 8601 with the UTC offset, e.g. 2026-11-29T18:25:46+01:00."""
    when = time.localtime(seconds)
    offset = time.strftime("%z", when)
    return time.strftime("%Y-%m-%dT%H:%M:%S", when) + f"{offset[:3]}:{offset[3:]}"


def _ps_row(entry: dict) -> dict:
    return {"id": entry["id"], "name": entry["name"], "state": entry["state"],
            "pid": entry["pid"], "started": _local_time(entry["started"]),
            "command": entry["command"], "layers": entry["layer_count"],
            "status": entry["status"], "cause": entry.get("cause"),
            "usage": entry.get("usage", {})}


def _size(count: int | None) -> str:
    """Bytes as ps shows them: 12K, 340M, 1.5G; "-" when not counted."""
    if count is None:
        return "-"
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{count}B"


# ---------------------------------------------------------------- tree


def tree(argv: list[str]) -> int:
    flags, _, positional = parse(argv, {"--json": False}, {})
    if len(positional) > 1:
        raise UsageError("tree takes at most one instance id")
    with connect() as conn:  # (an id: the daemon finds it as for every other command)
        instances = conn.call("io.bbl.Manager.List", **({"id": positional[0]} if positional
                                                        else {}))["instances"]
    trees = [{"id": i["id"], "name": i["name"], "command": i["command"], "pid": i.get("pid"),
              "layers": _layer_tree(i["layers"])} for i in instances]
    if flags["--json"]:
        _print_json(trees)
        return 0
    for instance in trees:
        print(printable(f"{instance['id']} {instance['name']}: ") +
              _command(instance["command"]))
        for layer in instance["layers"]:
            _draw(layer, "  ")
    return 0


def _layer_tree(layers: list[dict]) -> list[dict]:
    """The flat layer list (parents first) as nested objects, each with its processes."""
    supervisors = {layer["pid"] for layer in layers}
    nodes = {}
    roots = []
    for layer in layers:
        alive = layer["pid"] > 0 and os.path.exists(f"/proc/{layer['pid']}")
        node = {"name": layer["layer"], "pid": layer["pid"] if alive else None,
                "uid": layer.get("uid"), "gid": layer.get("gid"), "fate": layer.get("fate"),
                "namespaces": layer["namespaces"],
                **({"limits": layer["limits"], "usage": layer.get("usage", {})}
                   if "limits" in layer else {}),
                "processes": _processes(layer["pid"], supervisors) if alive else [],
                "children": []}
        nodes[node["name"]] = node
        parent = nodes.get(layer.get("parent"))
        (parent["children"] if parent else roots).append(node)
    return roots


def _processes(supervisor: int, supervisors: set[int]) -> list[dict]:
    """The layer's processes: the supervisor's descendants that are not other layers."""
    found, queue = [], _children(supervisor)
    while queue:
        pid = queue.pop(0)
        if pid in supervisors:
            continue
        found.append({"pid": pid, "command": _cmdline(pid)})
        queue += _children(pid)
    return found


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass  # it ended meanwhile
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def _any_alive(nodes: list[dict]) -> bool:
    return any(node["pid"] or _any_alive(node["children"]) for node in nodes)


def _draw(node: dict, indent: str, parent: dict | None = None) -> None:
    """One line a layer: its pid (or why it has none), uid:gid, and the namespaces it made
    (those that differ from its parent's, or for a top layer from bblctl's own; the inodes
    are in --json)."""
    fate = node["fate"]  # (bbld.engine.fates)
    if node["pid"] and fate == "retire":
        pid = f"pid {node['pid']} (a minimal init)"
    elif node["pid"] and fate == "replaced":
        pid = f"pid {node['pid']} (the command itself)"
    elif node["pid"]:
        pid = f"pid {node['pid']}"
    elif fate == "inline" and _any_alive(node["children"]):
        pid = "no process (built by its parent)"
    elif fate == "step-aside" and _any_alive(node["children"]):
        pid = "no supervisor (its sub-layers live on)"
    else:
        pid = "ended (nothing left to run)"
    outer = parent["namespaces"] if parent else _own_namespaces()
    made = sorted(NS_SHORT.get(name, name) for name, inode in node["namespaces"].items()
                  if outer.get(name) != inode)
    print(f"{indent}{printable(node['name'])}  {pid}  uid {node['uid']}:{node['gid']}  "
          f"new: {' '.join(made) or 'none'}")
    for process in node["processes"]:
        print(f"{indent}  · {process['pid']} {_command(process['command'])}")
    for child in node["children"]:
        _draw(child, indent + "  ", node)


NS_SHORT = {"time_for_children": "time"}


def _own_namespaces() -> dict[str, int]:
    found = {}
    for name in os.listdir("/proc/self/ns"):
        try:
            found[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            continue
    return found


# ---------------------------------------------------------------- stop, kill


MAX_TIMEOUT = 86400  # seconds stop may wait for SIGTERM to do its work (a day)


def stop(argv: list[str]) -> int:
    _, values, positional = parse(argv, {}, {"--timeout": "10"})
    instance = _one_instance(positional, "stop")
    try:
        timeout = float(values["--timeout"])
    except ValueError:
        timeout = -1.0
    if not 0 <= timeout <= MAX_TIMEOUT:  # (nan is neither)
        raise UsageError(f"--timeout {values['--timeout']!r}: give seconds from 0 to "
                         f"{MAX_TIMEOUT}, e.g. 5")
    shown = printable(instance)
    with connect() as conn:
        conn.call("io.bbl.Manager.Signal", id=instance, signal=0)  # (it runs: else one line)
        print(f"bblctl: stopping {shown}: SIGTERM to its app, SIGKILL to the whole instance "
              f"if it still runs after {values['--timeout']} s", file=sys.stderr)
        said = conn.call("io.bbl.Manager.Stop", id=instance, timeout=timeout)
    how = f"killed after {values['--timeout']} s" if said.get("killed") else "terminated"
    print(f"bblctl: {shown}: {how} (status {said.get('status')})", file=sys.stderr)
    return 0


def kill(argv: list[str]) -> int:
    _, values, positional = parse(argv, {}, {"--signal": "KILL"})
    instance = _one_instance(positional, "kill")
    number = signal_number(values["--signal"])
    with connect() as conn:
        conn.call("io.bbl.Manager.Signal", id=instance, signal=number)
    return 0


def _one_instance(positional: list[str], command: str) -> str:
    if len(positional) != 1:
        raise UsageError(f"{command} takes one instance id or name; see bblctl ps")
    return positional[0]
