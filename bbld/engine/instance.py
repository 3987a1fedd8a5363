"""The engine's caller side: start an instance's layer tree and follow it to its end.

`Instance.start()` clones layer 1, collects every layer's reports, releases the whole tree at
once when every layer is built (nothing untrusted runs before the tree is complete), and
returns when every command runs, or raises StartError with the failing layer's message after
killing everything it started. `Instance.wait()` forwards signals to layer 1 and returns the
main command's exit status.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket

import msgspec

from bbld import channel
from bbld.engine import bwrap_status, namespaces, reports
from bbld.engine import syscalls as sc
from bbld.engine.cgroups import Cgroups
from bbld.engine.cgroups import settings as cgroup_settings
from bbld.engine.enter import Entered, enter
from bbld.engine.errors import EXIT_USAGE, FIELDS, StartError
from bbld.engine.plan import Plan
from bbld.engine.processes import (
    ENDING_SIGNALS,
    FORWARDED_SIGNALS,
    SI_KERNEL,
    block_signals,
    children,
    exit_code,
    kill_all_children,
    read_signals,
)
from bbld.engine.supervisor import Context, spawn_layer


class Instance:
    def __init__(self, plan: Plan, environ: dict[str, str] | None = None,
                 manager: bool = False):
        self.plan = plan
        # We manage the instance (bbld's monitor): layer 1 dies with us whatever the spec's
        # die_with_parent says, so that no sandbox outlives the one process that manages it.
        self.layer1_dies_with_us = manager or plan.sandbox.die_with_parent
        # what layer 1 starts from (default: ours)
        self.environ = dict(os.environ if environ is None else environ)
        self.layer_names = [p.name for p in plan.layers()]
        self.barrier = {p.name for p in plan.layers() if not p.gated}
        self.networks = {p.name: p.layer.network for p in plan.layers() if p.layer.network}
        self.built: dict[str, reports.Built] = {}
        # layer name -> pidfd of its supervisor (None: built by its parent's, LayerPlan.inline)
        self.pidfds: dict[str, int | None] = {}
        self.main_layer = plan.main.name
        # Plan.direct: the signals for the main command go straight to its layer's
        # supervisor, which sees them come from outside its pid namespace and accepts them;
        # no layer between relays them (some have no supervisor left). Else layer 1 relays.
        self.direct = plan.direct and self.main_layer != plan.root.name
        self.main_pidfd: int | None = None  # the main command, once it runs
        self.main_tty: int | None = None  # its pty master (Command.tty), for our caller to take
        self.namespace_fds: dict[str, dict[str, int]] = {}  # layer -> /proc/PID/ns name -> fd
        self.watches: dict[int, object] = {}  # fd -> callback (Instance.watch)
        self.rules = reports.StartRules(self.layer_names, self.main_layer)
        self.failure: StartError | None = None
        self.status: int | None = None  # layer 1's exit status, once it ended
        self.main_status: int | None = None  # the main command's, as its layer reported it
        self.released = False
        self.torn_down = False
        self.reports_open = True
        # pidfd -> pid of the children followed by pidfd (enter()'s), reaped with reap()
        self.followed: dict[int, int] = {}
        # What start() makes (None until then, and again once torn down):
        self.proc_fd: int | None = None  # our procfs, O_PATH: id maps, /proc/self lookups
        self.sock: socket.socket | None = None  # the report channel's end
        self.go_w: int | None = None  # the go pipe's end: one byte per layer releases them
        self.sigfd = -1  # the signals we forward, blocked into a signalfd
        self.ignored: set[int] = set()  # signals the caller ignores (nohup): not forwarded
        self.cgroups: Cgroups | None = None
        self.cause: str | None = None  # why it ended, when a limit ended it
        self.cwd: str | None = None
        self.layer1 = None  # its Spawned (pid, pidfd)
        self.setups: dict = {}  # layer -> its network's netsetup.Setup, begun once it is built
        self.nats: list = []  # the NAT processes of layers with a network (netsetup.Child)
        self.ending: list = []  # those killed by the end, still to reap (Instance.finish)
        self.poller: select.poll | None = None

    # ------------------------------------------------------------ start

    def start(self) -> None:
        self.proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if sc.fstatfs_type(self.proc_fd) != sc.PROC_SUPER_MAGIC:
                raise StartError("/proc is not a procfs")
            if os.readlink("self", dir_fd=self.proc_fd) != str(os.getpid()):  # (ids by pid)
                raise StartError("/proc is the procfs of another pid namespace than ours (an "
                                 "outer sandbox's?): give this one its own (bubblewrap's "
                                 "--proc /proc)")
        except BaseException:
            self._teardown()
            raise
        self.sock, theirs = socket.socketpair(socket.AF_UNIX,
                                              socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        go_r, self.go_w = os.pipe2(os.O_CLOEXEC)
        # A signal the caller ignores (nohup, a background job) stays ignored: not forwarded.
        self.ignored = {s for s in FORWARDED_SIGNALS if sc.signal_ignored(s)}
        self.sigfd = block_signals()
        ctx = Context(plan=self.plan, report=theirs, go_fd=go_r)
        sandbox = self.plan.sandbox
        external_maps = self._await_external_maps if sandbox.userns_block_fd is not None else None
        try:
            try:
                self.cgroups = Cgroups(self.plan)
                if self.plan.adopts_orphans:
                    sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
                _join_namespaces(self.plan.root.layer.join)
                self.cwd = os.getcwd()
                self.layer1 = spawn_layer(self.plan.root, ctx, self.proc_fd, self.environ,
                                          self.cwd, self.layer1_dies_with_us, external_maps)
            finally:
                theirs.close()
                os.close(go_r)
            self.sock.setblocking(False)
            self.poller = select.poll()
            for fd in (self.sock.fileno(), self.layer1.pidfd, self.sigfd):
                self.poller.register(fd, select.POLLIN)
            while not self._started():
                self._step()
        except BaseException:
            self._teardown()
            self.finish()
            raise
        root = self.plan.root.name
        if root in self.built and sandbox.userns_block_fd is None:
            bwrap_status.started(sandbox, self._joinable_pid(), self.built[root].namespaces)

    def _joinable_pid(self) -> int:
        """The pid bubblewrap's --info-fd reports: a process in layer 1's namespaces whose
        /proc/PID/ns/* the caller may open (tools join a sandbox that way). Supervisors are
        not dumpable (nothing inside may ptrace them); the main command is, so it is the one
        when only user namespaces lie between it and layer 1 (bubblewrap's own child is in
        such a nested one too); else layer 1's supervisor."""
        node = self.plan.root
        while node is not None and node.name != self.main_layer:
            node = node.main_child
            if node is not None and set(node.layer.namespaces) - {"user"}:
                node = None
        pid = self.main_pid if node is not None else None
        return pid or pidfd_pid(self.pidfds[self.plan.root.name])

    def _await_external_maps(self, pid: int) -> None:
        """bubblewrap's --userns-block-fd: tell the map writer the pid, wait until it is done."""
        inodes = {}
        for name in namespaces.LINKS:
            try:
                inodes[name] = os.stat(f"{pid}/ns/{name}", dir_fd=self.proc_fd).st_ino
            except OSError:
                pass
        bwrap_status.started(self.plan.sandbox, pid, inodes)
        os.read(self.plan.sandbox.userns_block_fd, 1)

    def _started(self) -> bool:
        if self.failure is not None:
            raise self.failure
        if not self.released and self.barrier <= self.built.keys():
            self._connect_networks()
            if self.plan.sandbox.block_fd is not None:  # bubblewrap's --block-fd
                os.read(self.plan.sandbox.block_fd, 1)
            os.write(self.go_w, b"1" * len(self.layer_names))  # one byte for every layer
            os.close(self.go_w)
            self.released = True
        if self.released and (self.barrier <= self.rules.running or self.status is not None):
            # Released and ended already: the main command ran and ended before slower
            # layers even reported (the end of layer 1 took them along). Not a failure.
            return True
        if self.status is not None:
            raise StartError(f"exited during start with status {self.status}",
                             layer=self.plan.root.name)
        return False

    def _begin_network(self, name: str, net) -> None:
        """The layer is built: its `network` begins (bbld.engine.netsetup) while the rest of
        the tree is built."""
        from bbld.engine import netsetup  # (its imports: only for instances with a network)

        try:
            setup = netsetup.Setup(net, self.namespace_fds[name]["net"], self.environ)
        except StartError as exc:
            return self._fail(name, exc.message, exc.exit_code, exc.fields())
        self.setups[name] = setup
        for child in setup.children():  # (not orphans for _reap_orphans)
            self.followed[child.pidfd] = child.pid

    def _connect_networks(self) -> None:
        """Each built layer's `network` (NAT, egress rules, shaping) complete before the go
        byte: nothing of the sandbox runs before they hold."""
        while self.setups:
            name, setup = self.setups.popitem()
            for child in setup.children():
                self.followed.pop(child.pidfd, None)
            try:
                nat = setup.complete()
            except StartError as exc:
                raise exc.located(layer=name) from None
            if nat is not None:
                self.nats.append(nat)
                self.followed[nat.pidfd] = nat.pid  # (not an orphan to reap)
                self.watch(nat.pidfd, lambda nat=nat, name=name: self._nat_ended(nat, name))

    def _nat_ended(self, nat, layer: str) -> None:
        """The NAT ended before the instance: the layer is cut off, the rest runs on."""
        self.unwatch(nat.pidfd)
        self.nats.remove(nat)
        self.followed.pop(nat.pidfd, None)
        nat.end()
        os.write(2, f"bbl: layer '{layer}': the NAT ended; the layer has no network beyond "
                    f"its own any more\n".encode())

    # ------------------------------------------------------------ running

    def wait(self) -> int:
        """Follow the instance until layer 1 ends; returns the main command's status."""
        try:
            while self.status is None:
                self._step()
                if self.failure is not None:  # a layer gated by a socket failed later
                    raise self.failure
            bwrap_status.exited(self.plan.sandbox, self.status)
            return self.status
        finally:
            self._teardown()

    def _step(self) -> None:
        for fd, _events in self.poller.poll():
            if fd == self.sigfd:
                self._forward_signals()
            elif fd == self.layer1.pidfd:
                self._read_reports()  # what layers said before they ended comes first
                status = exit_code(os.waitpid(self.layer1.pid, 0)[1])
                self.status = status if self.main_status is None else self.main_status
                self.poller.unregister(fd)
            elif fd == self.sock.fileno():
                self._read_reports()
            elif self.direct and fd == self.pidfds.get(self.main_layer):
                self._main_layer_ended()
            elif fd in self.watches:
                try:
                    self.watches[fd]()
                except Exception:  # a bug in a watcher must not end the instance,
                    import traceback  # (only for bugs: not in every monitor's memory)

                    traceback.print_exc()
                    self.unwatch(fd)  # nor make it spin on an fd that stays readable

    def watch(self, fd: int, callback, events: int = select.POLLIN) -> None:
        """Call `callback()` from the instance's loop whenever `fd` has one of `events`
        (readable; watched again, the events change)."""
        self.watches[fd] = callback
        self.poller.register(fd, events)

    def unwatch(self, fd: int) -> None:
        if self.watches.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def enter(self, layer: str | None, argv: list[str],
              stdio: tuple[int, int, int] | None) -> Entered:
        """Start `argv` in a running layer (default: the main command's), as its commands
        run; stdio None gives it a new pty from the layer's devpts. Raises StartError."""
        name = layer or self.main_layer
        if name not in self.namespace_fds or self._pid_namespace_gone(name):
            open_ = [n.name for n in self.plan.root.walk() if n.name in self.namespace_fds
                     and not self._pid_namespace_gone(n.name)]
            why = "has ended: nothing ran there, and its pid namespace went with its " \
                "supervisor" if name in self.namespace_fds else "runs in this instance"
            raise StartError(f"{'layer' if name in self.namespace_fds else 'no layer named'} "
                             f"{name!r} {why}; layers that can be entered: "
                             f"{', '.join(open_)}", EXIT_USAGE)
        if not argv or not argv[0]:
            raise StartError("no command given", EXIT_USAGE)
        env, cwd = self.plan.environment(name, self.environ)
        path = self.plan.path_to(name)
        cgroup = next((n.cgroup_fd for n in reversed(path) if n.cgroup_fd is not None), None)
        entered = enter(self.plan, path[-1], self.namespace_fds[name], argv, env,
                        (cwd, self.cwd), stdio, cgroup)
        entered.pid = pidfd_pid(entered.pidfd)
        self.followed[entered.joiner] = entered.joiner_pid
        self.followed[entered.pidfd] = entered.pid
        self.watch(entered.joiner, lambda: self._reap_joiner(entered.joiner))
        return entered

    def _pid_namespace_gone(self, name: str) -> bool:
        """A layer with a pid namespace of its own whose supervisor (its pid 1) ended: no
        process can join it any more (fork there fails with ENOMEM)."""
        node = next((n for n in self.plan.root.walk() if n.name == name), None)
        pidfd = self.pidfds.get(name)
        if node is None or "pid" not in node.layer.namespaces or pidfd is None:
            return False
        return bool(select.select([pidfd], [], [], 0)[0])

    def reap(self, pidfd: int) -> os.waitid_result:
        """Reap a child followed by its pidfd (enter()'s command or joiner)."""
        self.followed.pop(pidfd, None)
        return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | sc.WALL)

    def _reap_joiner(self, pidfd: int) -> None:
        self.unwatch(pidfd)
        self.reap(pidfd)
        os.close(pidfd)

    def _reap_orphans(self) -> None:
        """Reap what the sandbox left to us as its subreaper (Plan.adopts_orphans): every
        child but layer 1 and those followed by pidfd, which are reaped where they are
        followed."""
        for pid in (children(self.proc_fd) or set()) - {self.layer1.pid,
                                                        *self.followed.values()}:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    @property
    def main_pid(self) -> int | None:
        """The main command's pid in our pid namespace (None if unknown or ended)."""
        pid = pidfd_pid(self.main_pidfd) if self.main_pidfd is not None else -1
        return pid if pid > 0 else None

    def layers_info(self) -> list[dict]:
        """Each built layer, parents first: its name, its parent's, the host pid of its
        supervisor (0 if it has none: LayerPlan.inline), its namespace inode numbers, its
        uid/gid inside, and its fate (engine.fates)."""
        info = []

        def visit(node, parent, uid, gid):
            layer = node.layer
            uid = layer.uid if layer.uid is not None else uid
            gid = layer.gid if layer.gid is not None else gid
            if node.name in self.built:
                pidfd = self.pidfds[node.name]
                info.append({"layer": node.name, "parent": parent,
                             "pid": pidfd_pid(pidfd) if pidfd is not None else 0,
                             "namespaces": self.built[node.name].namespaces,
                             "uid": uid, "gid": gid, "fate": node.fate})
                if self.cgroups is not None and node.name in self.cgroups.paths:
                    info[-1]["cgroup"] = self.cgroups.paths[node.name]
                    info[-1]["limits"] = cgroup_settings(layer)
            for child in node.children:
                visit(child, node.name, uid, gid)

        visit(self.plan.root, None, os.getuid(), os.getgid())
        return info

    def _forward_signals(self) -> None:
        for signo, code, _sender in read_signals(self.sigfd):
            if signo == signal.SIGCHLD and self.plan.adopts_orphans:
                self._reap_orphans()
            if signo == signal.SIGCHLD or signo in self.ignored or self.status is not None:
                continue
            if code == SI_KERNEL and not self._main_has_own_session():
                continue  # the terminal already signalled the command's process group
            self.signal(signo)

    def signal(self, signo: int) -> None:
        """Send `signo` to the instance: the five forwarded signals are meant for the main
        command, any other goes to layer 1 (SIGKILL ends the whole tree)."""
        target = self.layer1.pidfd
        if signo in FORWARDED_SIGNALS and self.direct:
            if self.main_layer not in self.pidfds:  # still starting: layer 1 may be an init
                if signo in ENDING_SIGNALS:
                    self._fail(self.plan.root.name,
                               f"exited during start with status {128 + signo}", 128 + signo)
                return
            target = self.pidfds[self.main_layer]
        try:
            sc.pidfd_send_signal(target, signo)
        except ProcessLookupError:
            pass  # ended, not yet reaped

    def _main_layer_ended(self) -> None:
        """The main command's layer's supervisor ended. It said MainEnded first, unless it
        died without a word: then nothing above it may notice (their supervisors may have
        left), so the instance ends here."""
        self.poller.unregister(self.pidfds[self.main_layer])
        self._read_reports()
        if self.main_status is None and self.status is None:
            self._main_ended(128 + signal.SIGKILL)

    def _main_has_own_session(self) -> bool:
        return self.plan.main.layer.command.new_session

    def _read_reports(self) -> None:
        while self.reports_open:
            try:
                report, fds = reports.receive(self.sock)
            except BlockingIOError:
                return
            except (ValueError, OSError) as exc:
                self._fail(None, f"bad report from a layer: {exc}")
                return
            if report is None:  # every layer supervisor has ended
                self.poller.unregister(self.sock.fileno())
                self.reports_open = False
                return
            self._accept(report, fds)

    def _accept(self, report: reports.Report, fds: list[int]) -> None:
        """Act on a report the rules accept (reports.StartRules); any other fails the start.
        Its fds are ours to keep or close."""
        problem = "unexpected report Built" if isinstance(report, reports.Built) and \
            not _namespace_fds_match(report, fds) else self.rules.judge(report, len(fds))
        name = report.layer
        if problem is not None or isinstance(report, reports.Failed):
            channel.close_all(fds)
            known = name if name in self.layer_names else None
            if problem is not None:
                return self._fail(known, problem)
            return self._fail(name, report.message, report.exit_code, report.fields)
        if isinstance(report, reports.Built):
            self.built[name] = report
            self.pidfds[name] = fds.pop(0) if report.process else None
            self.namespace_fds[name] = dict(zip(report.namespace_fds, fds, strict=True))
            if name == self.main_layer and self.direct:
                self.poller.register(self.pidfds[name], select.POLLIN)  # _main_layer_ended
            if name in self.networks:
                self._begin_network(name, self.networks[name])
        elif isinstance(report, reports.MainEnded):
            self._main_ended(report.status)
        elif fds and name == self.main_layer and self.main_pidfd is None:  # Running
            self.main_pidfd = fds[0]
            self.main_tty = fds[1] if len(fds) == 2 else None
        else:
            channel.close_all(fds)

    def _main_ended(self, status: int) -> None:
        """The main command ended: the tree would now end layer by layer, each noticing its
        child's end (milliseconds each). When layer 1 is pid 1 of its own pid namespace, its
        end takes all of it along at once. (Without one, the chain must run: each layer
        kills the processes it adopted as it ends, which a SIGKILL would skip.)"""
        if self.main_status is None:
            self.main_status = status
            if "pid" not in self.plan.root.layer.namespaces:
                return
            try:
                sc.pidfd_send_signal(self.layer1.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _fail(self, layer: str | None, message: str, code: int = 1,
              fields: dict[str, str] | None = None) -> None:
        if self.failure is None:  # the first failure is the cause; later ones are echoes
            known = {name: value for name, value in (fields or {}).items() if name in FIELDS}
            self.failure = StartError(message, code, layer=layer, **known)

    # ------------------------------------------------------------ the end

    def finish(self) -> None:
        """Reap the NAT processes the end killed: their exit takes tens of milliseconds (the
        tap device goes), which a caller need not wait for before it tells the end."""
        for nat in self.ending:
            nat.end()
        self.ending = []

    def _teardown(self) -> None:
        """Kill what is left of the tree, reap layer 1, and close our fds (once).

        Layer 1 takes everything below it along: its pid namespace collapses, or (without
        one) every supervisor below it dies by its parent-death signal.
        """
        if self.torn_down:
            return
        self.torn_down = True
        for setup in self.setups.values():  # (begun, never completed: a failed start)
            setup.abandon()
        self.setups.clear()
        for nat in self.nats:  # first: (pasta would outlive the namespace it serves), and
            nat.kill()  # its exit takes longer than the rest of the end; reaped by finish()
        self.ending, self.nats = self.nats, []
        layer1 = self.layer1
        if layer1 is not None:
            if self.status is None:
                try:
                    sc.pidfd_send_signal(layer1.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.status = exit_code(os.waitpid(layer1.pid, 0)[1])
            os.close(layer1.pidfd)
            if self.plan.adopts_orphans:  # what the sandbox left behind ends with it
                kill_all_children(self.proc_fd)
        if self.cgroups is not None:
            self.cause = self.cgroups.cause()
            self.cgroups.remove()
        namespace_fds = [fd for fds in self.namespace_fds.values() for fd in fds.values()]
        pidfds = [fd for fd in self.pidfds.values() if fd is not None]
        for fd in (*pidfds, self.sigfd, self.proc_fd, self.main_pidfd, self.main_tty,
                   *namespace_fds):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.proc_fd = None
        self.pidfds.clear()
        self.namespace_fds.clear()
        self.main_tty = None
        self.main_pidfd = None
        self.sigfd = -1
        if self.plan.sandbox.sync_fd is not None:  # bubblewrap's --sync-fd: closes at the end
            try:
                os.close(self.plan.sandbox.sync_fd)
            except OSError:
                pass
        if not self.released and self.go_w is not None:
            os.close(self.go_w)
            self.released = True
        if self.sock is not None:
            self.sock.close()
        sc.set_signal_mask(signal.SIG_UNBLOCK, (*FORWARDED_SIGNALS, signal.SIGCHLD))


def _namespace_fds_match(report: reports.Built, fds: list[int]) -> bool:
    """A pidfd (unless the layer has no process of its own), then one namespace fd per name,
    each the namespace the report names."""
    first = 1 if report.process else 0
    if len(fds) != first + len(report.namespace_fds) or len(set(report.namespace_fds)) != \
            len(report.namespace_fds):
        return False
    for name, fd in zip(report.namespace_fds, fds[first:], strict=True):
        if name not in namespaces.LINKS or sc.fstatfs_type(fd) != sc.NSFS_MAGIC \
                or os.fstat(fd).st_ino != report.namespaces.get(name):
            return False
    return True


def _join_namespaces(join) -> None:
    """Enter the namespaces the top layer joins; its clone then happens inside them."""
    if join is None:
        return
    for fd, kind, flag in ((join.user, "user", sc.CLONE_NEWUSER),
                           (join.pid, "pid", sc.CLONE_NEWPID)):
        if fd is None:
            continue
        try:
            sc.setns(fd, flag)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EINVAL:
                hint = (" (it might not be a descendant of the current user namespace)"
                        if kind == "user" else " (is it a pid namespace?)")
            raise StartError(f"joining the {kind} namespace of fd {fd}: {exc.strerror}{hint}",
                             what=f"join-{kind}", strerror=exc.strerror) from None


def pidfd_pid(pidfd: int) -> int:
    """The pid (in our pid namespace) of the process a pidfd refers to; -1 once it ended."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return -1


def run(plan: Plan, info_fd: int | None = None) -> int:
    """Start the instance in the foreground and return the main command's exit status.

    With `info_fd`, one JSON object per layer (see Instance.layers_info) is written there as
    a line once the instance runs, and the fd is closed.
    """
    instance = Instance(plan)
    instance.start()
    if info_fd is not None:
        with open(info_fd, "wb", closefd=True) as out:
            for entry in instance.layers_info():
                out.write(msgspec.json.encode(entry) + b"\n")
    try:
        return instance.wait()
    finally:
        instance.finish()
