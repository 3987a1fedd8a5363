"""A layer's supervisor: the process that builds one layer, then watches over it.

`spawn_layer()` runs in the parent (a supervisor, or the engine's caller for layer 1): it
clones the child straight into the layer's namespaces, writes the child's uid/gid maps and
releases it. The child builds its view, spawns its own sub-layers the same way, reports
`Built`, waits for the instance-wide go, starts its commands, reports `Running`, and then
supervises: it reaps every child, forwards signals from its parent to its main (its command,
or the sub-layer that leads to the instance's main command), and when the main ends it ends
the layer and exits with the main's status (128+N for a signal).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import time
from contextlib import contextmanager

from msgspec import Struct

from bbld import spec
from bbld.engine import filesystem, namespaces, network, privileges, reports, terminal
from bbld.engine import syscalls as sc
from bbld.engine.commands import Prepared, change_directory, restrict_and_exec, start_fresh
from bbld.engine.errors import StartError
from bbld.engine.plan import LayerPlan, Plan
from bbld.engine.processes import (
    ENDING_SIGNALS,
    SI_KERNEL,
    block_signals,
    exit_code,
    kill_all_children,
    read_signals,
    reap_all,
)


class Context(Struct, kw_only=True):
    """What every layer of one instance shares, inherited in memory through fork."""
    plan: Plan
    report: socket.socket  # the layers' end of the report socketpair
    go_fd: int  # one byte per layer arrives here when every layer is built


class Child(Struct):
    pid: int
    pidfd: int


@contextmanager
def step(what: str):
    """Turn a kernel refusal during `what` into a one-line StartError."""
    try:
        yield
    except OSError as exc:
        raise StartError(f"{what}: {exc.strerror or exc}") from None


def _clone_failure(exc: OSError, flags: int) -> str:
    if exc.errno == errno.ENOSPC:  # (bubblewrap's words: a nested bwrap says the same)
        return "nesting depth or /proc/sys/user/max_*_namespaces exceeded (ENOSPC)"
    hint = " (are unprivileged user namespaces enabled?)" if flags & sc.CLONE_NEWUSER else ""
    return f"{exc.strerror}{hint}"


def spawn_layer(plan: LayerPlan, ctx: Context, proc_fd: int, env: dict[str, str], cwd: str,
                die_with_parent: bool = True, maps_written_by=None) -> Child:
    """Clone `plan`'s layer from this process. Returns once the child is released.

    `maps_written_by(pid)`, if given, returns once someone else wrote the child's id maps.
    """
    layer = plan.layer
    flags = 0
    for name in layer.namespaces:
        flags |= namespaces.CLONE_FLAGS.get(name, 0)
    uid, gid = os.getuid(), os.getgid()
    release_r, release_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, pidfd = sc.clone(flags, cgroup_fd=plan.cgroup_fd)
    except OSError as exc:
        os.close(release_r)
        os.close(release_w)
        detail = _clone_failure(exc, flags)
        raise StartError(f"cannot create the layer's namespaces: {detail}", layer=plan.name,
                         what="namespaces", strerror=detail) from None
    if pid == 0:
        _layer_main(plan, ctx, proc_fd, env, cwd, release_r, release_w, die_with_parent)
    os.close(release_r)
    try:
        if "user" in layer.namespaces:
            try:
                if maps_written_by is not None:
                    maps_written_by(pid)
                else:
                    privileges.write_id_maps(proc_fd, pid, layer, uid, gid)
            except StartError as exc:
                sc.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise exc.located(layer=plan.name) from None
        os.write(release_w, b"1")
    finally:
        os.close(release_w)
    return Child(pid, pidfd)


def _layer_main(plan, ctx, proc_fd, env, cwd, release_r, release_w, die_with_parent):
    """The child side of spawn_layer(). Never returns."""
    status = 1
    try:
        os.close(release_w)
        sc.set_cmdline(f"bbl-layer {plan.name}")  # (the sandbox can read it: no host paths)
        if die_with_parent:
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.read(release_r, 1) != b"1":  # the parent died or failed before releasing us
            os._exit(1)
        os.close(release_r)
        status = LayerSupervisor(plan, ctx, proc_fd, env, cwd, die_with_parent).run()
    except StartError as exc:
        _report_failure(ctx, exc.located(layer=plan.name))
        status = exc.exit_code
    except BaseException as exc:  # a bug: say where, but still end cleanly
        import traceback  # only for bugs: not in every supervisor's memory

        traceback.print_exc()
        _report_failure(ctx, StartError(f"internal error: {exc!r}", layer=plan.name))
    finally:
        os._exit(status)


def _report_failure(ctx: Context, error: StartError) -> None:
    try:
        reports.send(ctx.report, reports.Failed(layer=error.layer, message=error.message[:2000],
                                                exit_code=error.exit_code,
                                                fields=error.fields()))
    except OSError:
        pass


class LayerSupervisor:
    def __init__(self, plan: LayerPlan, ctx: Context, proc_fd: int, env: dict[str, str],
                 cwd: str, die_with_parent: bool):
        self.plan = plan
        self.die_with_parent = die_with_parent
        self.layer = plan.layer
        self.ctx = ctx
        self.proc_fd = proc_fd
        self.env = env
        self.cwd = cwd
        self.sigfd = -1
        self.children: dict[int, LayerPlan] = {}  # sub-layer supervisors by pid
        self.commands: set[int] = set()  # this layer's commands (main and companions)
        self.main_pid: int | None = None
        self.main_tty: int | None = None  # the main command's pty master, until reported
        self.idle_init: int | None = None  # when we retire: the program we become (O_PATH)
        self.sub_layer_left = False  # one stepped aside: we wait for the instance's end
        self.prepared: list[Prepared] = []  # our commands, until released

    @property
    def has_pid_namespace(self) -> bool:
        return "pid" in self.layer.namespaces

    # ------------------------------------------------------------ building

    def run(self) -> int:
        os.umask(0)  # modes in the spec are exact; commands get the caller's umask back
        self._close_inherited_fds()
        self.sigfd = block_signals()
        self._wait_for_sockets()
        if self.has_pid_namespace:
            self.proc_fd = self._private_procfs()
        if "user" in self.layer.namespaces:
            with step("taking the layer's identity"):
                if privileges.settle_supervisor(self.layer) and self.die_with_parent:
                    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the id change
        if self.layer.hostname is not None:
            with step("setting the hostname"):
                sc.sethostname(self.layer.hostname)
        if "net" in self.layer.namespaces:
            network.bring_up_loopback()
        if self.plan.retires:  # found in our parent's view, before ours replaces it
            self.idle_init = _open_idle_init()
        with step("building the filesystem view"):
            self._build_filesystem()
        if "time" in self.layer.namespaces:
            with step("creating the time namespace"):
                sc.unshare(sc.CLONE_NEWTIME)
        self.env = self._layer_env()
        self.cwd = self.layer.cwd or self.cwd
        for path in self.layer.lock_files:  # (each fd stays open, and its lock held, until
            self._lock(path)  # the layer ends: nothing else needs them)
        if not self.has_pid_namespace and not self.plan.steps_aside and not self.plan.replaced:
            # orphans of this layer come back to us (not to a command: exec keeps the flag)
            sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
        self._spawn_sub_layers()
        if self.layer.user_namespaces == "deny":  # after our sub-layers: they count too
            self._deny_user_namespaces()
        sc.prctl(sc.PR_SET_DUMPABLE, 0)  # nothing in the sandbox may ptrace or read us
        self._report_built()
        if self.plan.runs_commands:
            if not self.plan.replaced:
                self._prepare_commands()  # while the other layers are still being built
                self._start_commands(early=True)
            aborted = self._wait_for_go()
            if aborted is not None:
                return aborted
            if self.plan.replaced:
                self._replace_with_command()
            self._start_commands()
        else:  # nothing of ours waits for the instance-wide go (our sub-layers' commands do)
            os.close(self.ctx.go_fd)
        self._report_running(self.main_pid if self.plan.runs_main else None)
        if self.plan.steps_aside:
            return self._step_aside()
        if self.plan.retires and self.idle_init is not None:
            _become_idle_init(self.plan.name, self.idle_init)
        if self.main_pid is None and not self.children and not self.commands \
                and not self.sub_layer_left:
            _exit_in_idle_time()
            return 0  # nothing to run and nothing below: the layer is done
        return self._supervise()

    def _close_inherited_fds(self) -> None:
        keep = {0, 1, 2, self.ctx.report.fileno(), self.ctx.go_fd, self.proc_fd}
        cgroups = {node.cgroup_fd for node in self.plan.walk() if node.cgroup_fd is not None}
        sc.close_all_fds_except(keep | self.plan.fds | cgroups)

    def _spawn_sub_layers(self) -> None:
        """A layer that steps aside clones its sub-layers without the parent-death signal:
        its exit must not kill them (layer 1's pid namespace ends them when it ends)."""
        for child_plan in self.plan.children:
            if child_plan.inline:
                self._build_inline(child_plan)
                continue
            child = spawn_layer(child_plan, self.ctx, self.proc_fd, self.env, self.cwd,
                                die_with_parent=not self.plan.steps_aside)
            os.close(child.pidfd)
            self.children[child.pid] = child_plan
            if child_plan is self.plan.main_child:
                self.main_pid = child.pid

    def _build_inline(self, child_plan: LayerPlan) -> None:
        """A sub-layer without a process (LayerPlan.inline), built here in a mount namespace
        of its own; then back to ours. Its sub-layers are our children now, but not ours to
        wait for (as if it had stepped aside): the instance's end ends them."""
        back = os.open("self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.proc_fd)
        try:
            LayerSupervisor(child_plan, self.ctx, self.proc_fd, self.env, self.cwd,
                            die_with_parent=False).build_inline()
        except StartError as exc:
            raise exc.located(layer=child_plan.name) from None
        finally:
            sc.setns(back, sc.CLONE_NEWNS)  # (its root becomes our root and cwd again)
            os.close(back)
        self.sub_layer_left = True

    def build_inline(self) -> None:
        """run()'s building steps for a layer built by its parent's process: a new mount
        namespace (its only one) made a slave of the parent's, the environment and cwd its
        sub-layers start from, its reports (no pidfd), its sub-layers."""
        with step("creating the layer's mount namespace"):
            sc.unshare(sc.CLONE_NEWNS)
        with step("building the filesystem view"):
            self._build_filesystem()
        self.env = self._layer_env()
        self.cwd = self.layer.cwd or self.cwd
        self._report_built()
        self._spawn_sub_layers()
        self._report_running(None)

    def _lock(self, path: str) -> int:
        """bubblewrap's --lock-file: a read lock on `path`, held until the layer ends."""
        with step(f"lock_files: {path}"):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
        return fd

    def _deny_user_namespaces(self) -> None:
        """Limit this layer's user namespace to the user namespaces that exist below it now.

        The limit counts hierarchically, so nothing in this layer or any layer below can create
        one; raising it again takes CAP_SYS_RESOURCE in this namespace, which spec.check()
        keeps from the layer's commands. The sysctl file shows the opener's user namespace."""
        with step("denying new user namespaces (sys/user/max_user_namespaces)"):
            fd = os.open("sys/user/max_user_namespaces", os.O_WRONLY | os.O_CLOEXEC,
                         dir_fd=self.proc_fd)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def _wait_for_sockets(self) -> None:
        deadline = time.monotonic() + self.layer.start_timeout
        for path in self.layer.start_after:
            _wait_for_listener(path, deadline)

    def _private_procfs(self) -> int:
        """A procfs of this layer's pid namespace, detached, for this supervisor's own use."""
        try:
            fd = sc.fsmount_new("proc", {}, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
                                | sc.MOUNT_ATTR_NOEXEC)
        except OSError as exc:
            raise StartError(
                f"cannot mount a procfs for the layer's pid namespace ({exc.strerror}); the "
                "parent layer's view must show a complete /proc (give it a proc op)") from None
        os.close(self.proc_fd)
        return fd

    def _build_filesystem(self) -> None:
        if "mount" not in self.layer.namespaces:
            return
        if self.layer.new_root:
            ws = filesystem.open_new_root(self.proc_fd)
        else:
            ws = filesystem.open_in_place(self.proc_fd)
        filesystem.apply(ws, self.layer.fs, self.plan.data)
        if self.has_pid_namespace and not self.layer.new_root \
                and not any(isinstance(op, spec.Proc) for op in self.layer.fs):
            self._cover_proc(ws)
        if self.layer.new_root:
            filesystem.enter_new_root(ws, self.layer.root_readonly)
        else:
            filesystem.finish_in_place(ws)
        os.chdir("/")

    def _cover_proc(self, ws: filesystem.Workspace) -> None:
        """A layer with its own pid namespace but no new root sees its own /proc."""
        try:
            target = filesystem._resolve(ws.new, "/proc")
        except FileNotFoundError:
            return
        try:
            if sc.fstatfs_type(target) == sc.PROC_SUPER_MAGIC:
                fresh = sc.fsmount_new("proc", {}, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
                                       | sc.MOUNT_ATTR_NOEXEC)
                sc.move_mount(fresh, target)
                os.close(fresh)
        finally:
            os.close(target)

    def _layer_env(self) -> dict[str, str]:
        env = {} if self.layer.env.clear else dict(self.env)
        for name in self.layer.env.unset:
            env.pop(name, None)
        env.update(self.layer.env.set)
        return env

    def _report_built(self) -> None:
        inodes, fds = {}, {}
        try:
            for name in namespaces.LINKS:
                try:
                    fds[name] = os.open(f"self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC,
                                        dir_fd=self.proc_fd)
                except OSError:
                    continue
                inodes[name] = os.fstat(fds[name]).st_ino
            names = list(fds)
            if not self.plan.inline:  # (a layer built by its parent's process has none)
                fds = {"pidfd": sc.pidfd_open(os.getpid()), **fds}
            report = reports.Built(layer=self.plan.name, namespaces=inodes,
                                   namespace_fds=names, process=not self.plan.inline)
            reports.send(self.ctx.report, report, tuple(fds.values()))
        finally:
            for fd in fds.values():
                os.close(fd)

    def _report_running(self, main_command: int | None) -> None:
        """Running, with a pidfd of the instance's main command if it runs here (the caller
        learns its pid in its own pid namespace from the pidfd, not from a number we say),
        then its pty master if it has one."""
        tty, self.main_tty = self.main_tty, None
        fds = (sc.pidfd_open(main_command),) if main_command is not None else ()
        try:
            reports.send(self.ctx.report, reports.Running(layer=self.plan.name),
                         fds + (tty,) if fds and tty is not None else fds)
        finally:
            for fd in fds if tty is None else (*fds, tty):
                os.close(fd)

    def _wait_for_go(self) -> int | None:
        """Block until the go byte arrives. Returns an exit status if the start is off."""
        poller = select.poll()
        poller.register(self.ctx.go_fd, select.POLLIN)
        poller.register(self.sigfd, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self.ctx.go_fd in ready:  # first: once released, children may end at once
                go = os.read(self.ctx.go_fd, 1)
                os.close(self.ctx.go_fd)
                return None if go else 1  # EOF: the caller is gone
            for signo, code, sender in read_signals(self.sigfd):
                if signo == signal.SIGCHLD:
                    self._check_children_during_start()
                elif signo in ENDING_SIGNALS and self._from_parent(code, sender):
                    return 128 + signo

    def _check_children_during_start(self) -> None:
        """A sub-layer may end before the go byte only when it has nothing to run itself
        (its sub-layers ended, or it stepped aside): else the start failed."""
        for pid, status in reap_all():
            child = self.children.pop(pid, None)
            prepared = next((p for p in self.prepared if p.pid == pid), None)
            self.commands.discard(pid)  # (an early companion may end: its business)
            if child is not None and child.steps_aside and status == 0:
                self._stepped_aside(pid)
            elif child is not None and (child.runs_commands or status != 0):
                raise StartError(f"exited during start with status {exit_code(status)}",
                                 layer=child.name)
            elif prepared is not None:  # it failed (its pipe says why) or was killed
                self._release(prepared)
                raise StartError(f"command {prepared.command.argv[0]!r}: ended with status "
                                 f"{exit_code(status)} before the start")

    # ------------------------------------------------------------ commands

    def _prepare_commands(self) -> None:
        """Fork the command and the companions now; each takes every last step but seccomp
        and execve, then waits for its release (after the go byte): the start then costs
        only the exec."""
        commands = [(self.layer.command, False)] if self.layer.command is not None else []
        self.prepared = [self._prepare(command, companion) for command, companion in
                         commands + [(command, True) for command in self.layer.companions]]

    def _start_commands(self, early: bool = False) -> None:
        """Release the prepared commands in order, each once the one before has executed
        (with `early`: only the companions that start before the go)."""
        for prepared in [p for p in self.prepared if p.command.early or not early]:
            self.prepared.remove(prepared)
            pid = self._release(prepared)
            if not prepared.companion and self.main_pid is None:
                self.main_pid = pid

    def _replace_with_command(self) -> None:
        """Exec the layer's command in this process (bubblewrap's --as-pid-1, and
        engine.fates)."""
        command = self.layer.command
        self._report_running(os.getpid() if self.plan.runs_main else None)
        try:
            self._exec(command, False, self.ctx.report.fileno(), os.getppid(),
                       parent_death_signal=self.die_with_parent)
        except StartError as exc:
            raise exc.located(f"command {command.argv[0]!r}", command=command.argv[0]) \
                from None

    def _prepare(self, command: spec.Command, companion: bool) -> Prepared:
        """Fork one command, which readies itself and waits for its release."""
        master, slave = terminal.open_pty() if command.tty else (None, None)
        errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
        release_r, release_w = os.pipe2(os.O_CLOEXEC)
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(errors_r)
                os.close(release_w)
                self._exec(command, companion, errors_w, supervisor, slave=slave,
                           release_fd=release_r)
            except BaseException as exc:
                os.write(errors_w, reports.failure(exc))
            finally:
                os._exit(127)
        os.close(errors_w)
        os.close(release_r)
        if slave is not None:
            os.close(slave)
            if companion or self.main_tty is not None:
                os.close(master)
            else:
                self.main_tty = master  # reported with Running, then closed here
        self.commands.add(pid)
        return Prepared(command, companion, pid, release_w, errors_r)

    def _release(self, prepared: Prepared) -> int:
        """Let a prepared command exec; raises StartError if it could not."""
        try:
            os.write(prepared.release, b"1")
        except BrokenPipeError:
            pass  # it failed already: its error pipe says why
        os.close(prepared.release)
        failure = b"".join(iter(lambda: os.read(prepared.errors, 4096), b""))
        os.close(prepared.errors)
        if failure:
            program = prepared.command.argv[0]
            raise reports.failed_command(reports.read_step(failure)).located(
                f"command {program!r}", command=program)
        return prepared.pid

    def _exec(self, command: spec.Command, companion: bool, errors_fd: int,
              supervisor: int, parent_death_signal: bool = True,
              slave: int | None = None, release_fd: int | None = None) -> None:
        """In the forked command process (or the supervisor itself, with
        LayerPlan.replaced): the last steps before execve, in this order; a
        prepared command waits for its release before seccomp and execve."""
        start_fresh(new_session=command.new_session or slave is not None)
        if slave is not None:
            terminal.take(slave)  # the sandbox's own pty
        if "user" in self.layer.namespaces or self.layer.join and self.layer.join.user is not None:
            privileges.become(self.layer)
        if parent_death_signal:
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != supervisor:  # it died before the line above took effect
                os._exit(1)
        if self.layer.user_namespaces == "assert-denied":
            privileges.assert_user_namespaces_denied()
        if slave is None and (command.stdin or ("null" if companion else "inherit")) == "null":
            empty_r, empty_w = os.pipe()
            os.close(empty_w)
            os.dup2(empty_r, 0)
            os.close(empty_r)
        if command.output == "null":
            null = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.close(null)
        cwd = self._command_cwd(command)
        restrict_and_exec(self.ctx.plan, self.plan, command, {**self.env, "PWD": cwd},
                          errors_fd, release_fd)

    def _command_cwd(self, command: spec.Command) -> str:
        return change_directory(command.cwd or self.layer.cwd, self.cwd, self.env.get("HOME"))

    # ------------------------------------------------------------ supervising

    def _supervise(self) -> int:
        poller = select.poll()
        poller.register(self.sigfd, select.POLLIN)
        while True:
            poller.poll()
            for signo, code, sender in read_signals(self.sigfd):
                if signo == signal.SIGCHLD:
                    status = self._collect()
                    if status is not None:
                        if self.plan.runs_main:
                            self._report_main_ended(status)
                        return self._end(status)
                elif not self._from_parent(code, sender):
                    continue  # only the parent layer may steer us
                elif self.main_pid is not None:
                    os.kill(self.main_pid, signo)
                elif signo in ENDING_SIGNALS:
                    return self._end(128 + signo)

    def _report_main_ended(self, status: int) -> None:
        try:
            reports.send(self.ctx.report, reports.MainEnded(layer=self.plan.name, status=status))
        except OSError:
            pass  # the caller is gone; our exit says it as well

    def _step_aside(self) -> int:
        """Exit: the kernel reparents our sub-layers to the nearest subreaper or init above
        (engine.fates)."""
        _exit_in_idle_time()
        return 0

    def _collect(self) -> int | None:
        """Reap children; the layer's status once it should end, else None."""
        for pid, status in reap_all():
            plan = self.children.pop(pid, None)
            if plan is not None and plan.steps_aside and status == 0:
                self._stepped_aside(pid)
            elif pid == self.main_pid:
                return exit_code(status)
            self.commands.discard(pid)
        if self.main_pid is None and not self.children and not self.commands \
                and not self.sub_layer_left:
            return 0
        return None

    def _stepped_aside(self, pid: int) -> None:
        """A sub-layer's supervisor left on purpose; its own sub-layers live on (no longer
        our children). Our end now comes with the instance's: the engine's caller follows
        the main command's layer itself."""
        self.sub_layer_left = True
        if pid == self.main_pid:
            self.main_pid = None

    def _from_parent(self, code: int, sender: int) -> bool:
        """Signals count only when the parent sent them (or anyone outside our pid ns)."""
        return code != SI_KERNEL and (sender == 0 or sender == os.getppid())

    def _end(self, status: int) -> int:
        """End the layer: with a pid namespace our exit kills the rest; else kill it here."""
        if not self.has_pid_namespace:
            kill_all_children(self.proc_fd)
        return status


IDLE_INIT = ("/usr/bin/sleep", "/bin/sleep")  # GNU sleep: "infinity" is a valid duration


def _open_idle_init() -> int | None:
    """The program a retiring supervisor becomes, opened before the layer's view replaces
    its parent's (which may not have it); None if there is none."""
    for path in IDLE_INIT:
        try:
            return os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
    return None


def _become_idle_init(layer: str, program: int) -> None:
    """Exec `sleep infinity` as pid 1 of the layer: SIGCHLD ignored, so the kernel reaps
    every child and orphan at once; the supervised signals stay blocked (only SIGKILL from
    outside ends it, which the end of layer 1's pid namespace sends); no fd but stdio;
    no_new_privs. Its memory is a fraction of an idle supervisor's (docs/performance.md).

    It keeps the supervisor's capabilities in the layer's user namespace. The exec makes it
    dumpable again, so they are what keeps others from ptrace and from its /proc links and
    memory (root, cwd, fd/N, mem, environ): that needs CAP_SYS_PTRACE there, or every
    capability it holds. (No command runs in its pid namespace: engine.fates._commands_see.) If the
    exec fails (the layer's view lacks the program's libraries), this process waits the same
    way, as Python, still not dumpable."""
    sc.ignore_signal(signal.SIGCHLD)
    reap_all()  # those that ended before
    privileges.no_new_privs()
    sc.close_all_fds_except({0, 1, 2, program})
    try:
        os.execve(program, [f"bbl-init {layer}", "infinity"], {})
    except OSError:
        while True:
            select.select([], [], [])


def _exit_in_idle_time() -> None:
    """For a process about to exit while the instance starts: releasing a forked
    interpreter's memory takes a millisecond or two of CPU, which on a small machine would
    come out of the start's own time. SCHED_IDLE runs it when nothing else wants the CPU
    (lowering one's own priority needs no privilege)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass


def _wait_for_listener(path: str, deadline: float) -> None:
    """Wait until a unix socket at `path` accepts connections.

    While the socket does not exist, inotify on its directory wakes us when it appears; between
    bind() and listen() (the file exists but refuses) we retry after short, growing pauses.
    """
    try:
        watch = sc.inotify_watch(os.path.dirname(path) or "/",
                                 sc.IN_CREATE | sc.IN_MOVED_TO | sc.IN_ATTRIB)
    except OSError:
        watch = None  # no directory to watch yet: pauses only
    delay = 0.001
    try:
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
                try:
                    probe.connect(path)
                    return
                except OSError as exc:
                    last, missing = exc.strerror, isinstance(exc, FileNotFoundError)
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(f"start_after: {path} did not accept connections in time "
                                 f"({last})")
            if missing and watch is not None:
                select.select([watch], [], [], left)
                while True:  # drain the events; we only needed the wake-up
                    try:
                        os.read(watch, 4096)
                    except BlockingIOError:
                        break
            else:
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)
    finally:
        if watch is not None:
            os.close(watch)
