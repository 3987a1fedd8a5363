"""Building a layer's filesystem view from its ordered list of operations.

With `new_root`, the layer first pivots onto an invisible scratch tmpfs, where the parent's view
sits at /oldroot and the future root (a fresh tmpfs) at /newroot; every operation then mounts
into /newroot, and a second pivot makes it `/` and drops the scratch (bubblewrap's proven flow).
Without `new_root` the operations apply in place to the layer's private copy of its parent's view.

Safety rules kept here:
- sources resolve inside the parent's view and destinations inside the new root
  (openat2 RESOLVE_IN_ROOT): a symlink never leads a mount outside;
- mounts are attached to the exact fd that was resolved (move_mount), never re-walked by path;
- binds are recursive and get their flags with mount_setattr(AT_RECURSIVE), so read-only holds
  on every submount, nosuid+nodev everywhere but dev-binds, and kernel-locked flags stay;
- mount points and their missing parents are created only on filesystems this layer created
  (its root tmpfs, its tmpfs mounts): never inside a bound host directory.
"""

from __future__ import annotations

import os
import posixpath
import stat

from bbld import spec
from bbld.engine import squashfs
from bbld.engine import syscalls as sc
from bbld.engine.errors import EXIT_USAGE, StartError

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY
RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
BIND_ATTRS = {
    spec.Bind: sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV,
    spec.RoBind: sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_RDONLY,
    spec.DevBind: sc.MOUNT_ATTR_NOSUID,
    spec.BindFd: sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV,
    spec.RoBindFd: sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_RDONLY,
}
TMPFS_ATTRS = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "fd": "/proc/self/fd", "core": "/proc/kcore",
             "ptmx": "pts/ptmx"}


class Workspace:
    """The fds a layer's build works through."""

    def __init__(self, old: int, new: int, scratch: int | None, scratch_path: str | None,
                 proc_fd: int, owned: set[int]):
        self.old = old  # the parent's view: sources resolve here
        self.new = new  # the root being built: destinations resolve here
        self.scratch = scratch  # an invisible tmpfs for objects the engine makes
        self.scratch_path = scratch_path  # its path during the build, when it has one
        self.proc_fd = proc_fd  # a procfs of this process's pid namespace
        self.owned = owned  # st_dev of filesystems this layer created
        self.counter = 0
        self.empty_file: str | None = None
        self.parents_mode = 0o755  # of the missing parents the current operation creates

    def unique(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def own(self, fd: int) -> None:
        self.owned.add(os.fstat(fd).st_dev)

    def scratch_fd(self) -> int:
        if self.scratch is None:  # in-place layers get a detached tmpfs on first need
            self.scratch = sc.fsmount_new("tmpfs", {"mode": "0700"}, TMPFS_ATTRS)
        return self.scratch


def open_new_root(proc_fd: int) -> Workspace:
    """Pivot onto a scratch tmpfs holding /oldroot (the parent's view) and /newroot."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)  # receive host events, never send
    scratch = sc.fsmount_new("tmpfs", {"mode": "0700"}, TMPFS_ATTRS)
    current_root = os.open("/", O_PATH_DIR | os.O_CLOEXEC)
    sc.move_mount(scratch, current_root)
    os.close(current_root)
    os.fchdir(scratch)
    os.mkdir("oldroot", 0o700)
    os.mkdir("newroot", 0o755)
    sc.pivot_root(".", "oldroot")
    os.chdir("/")
    new = sc.fsmount_new("tmpfs", {"mode": "0755"}, TMPFS_ATTRS)
    mount_point = os.open("/newroot", O_PATH_DIR | os.O_CLOEXEC)
    sc.move_mount(new, mount_point)
    os.close(mount_point)
    old = os.open("/oldroot", O_PATH_DIR | os.O_CLOEXEC)
    workspace = Workspace(old, new, scratch, "/", proc_fd, set())
    workspace.own(new)
    return workspace


def open_in_place(proc_fd: int) -> Workspace:
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    root = os.open("/", O_PATH_DIR | os.O_CLOEXEC)
    return Workspace(root, root, None, None, proc_fd, set())


def enter_new_root(ws: Workspace, readonly: bool) -> None:
    """Drop the parent's view and make the built root `/` (the scratch disappears)."""
    os.close(ws.old)
    sc.mount(None, "/oldroot", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.umount2("/oldroot", sc.MNT_DETACH)
    if readonly:
        sc.mount_setattr(ws.new, sc.MOUNT_ATTR_RDONLY | TMPFS_ATTRS, recursive=False)
    os.fchdir(ws.new)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")
    os.close(ws.new)
    os.close(ws.scratch)


def finish_in_place(ws: Workspace) -> None:
    os.close(ws.old)
    if ws.scratch is not None:
        os.close(ws.scratch)


def apply(ws: Workspace, ops: list[spec.FsOp], data: dict[int, bytes]) -> None:
    """Run every operation in order; `data` holds the bytes of file/bind-data ops by index."""
    for index, op in enumerate(ops):
        ws.parents_mode = 0o755 if op.parents_mode is None else op.parents_mode
        try:
            HANDLERS[type(op)](ws, op, data.get(index))
        except (StartError, OSError) as exc:
            raise _located(exc, index, op) from None


def _located(exc: StartError | OSError, index: int, op: spec.FsOp) -> StartError:
    """The error of operation `index`, said of it: as the spec numbers it, or as its front
    end knows it (op.origin: a profile's `mounts[0]`)."""
    if isinstance(exc, OSError):
        exc = StartError(exc.strerror or str(exc), strerror=exc.strerror)
    what = {"symlink": "symlink", "dir": "mkdir"}.get(op.kind)
    return exc.located(f"{op.origin or f'fs[{index}]'} ({op.kind}) {op.target}", path=op.target,
                       what=what, strerror=exc.message if what else None)


# ---------------------------------------------------------------- path resolution


def _resolve(dirfd: int, path: str, flags: int = os.O_PATH) -> int:
    return sc.openat2(dirfd, path, flags, RESOLVE)


def _source(ws: Workspace, path: str, optional: bool = False) -> int | None:
    try:
        return _resolve(ws.old, path)
    except FileNotFoundError:
        if optional:
            return None
        raise StartError(f"source {path} does not exist in the parent layer's view",
                         EXIT_USAGE, what="source-missing", path=path) from None


def _kernel_path(ws: Workspace, fd: int) -> str:
    """The path of `fd` as this process sees it now (for APIs that only take paths)."""
    return os.readlink(f"self/fd/{fd}", dir_fd=ws.proc_fd)


def _require_owned(ws: Workspace, parent_fd: int, path: str) -> None:
    if os.fstat(parent_fd).st_dev not in ws.owned:
        raise StartError(
            f"cannot create {path}: its parent is not on a filesystem this layer created "
            "(a bind of a host directory, or a layer without new_root), and creating it "
            "there would write to the host; create it on the host first, or mount elsewhere",
            EXIT_USAGE)


def _directory(ws: Workspace, path: str, depth: int = 0) -> int:
    """An O_PATH fd of directory `path` in the new root, creating missing parents safely.

    A dangling symlink on the way is followed inside the new root, and its target created
    there (as bubblewrap does), never outside.
    """
    try:
        return _resolve(ws.new, path, O_PATH_DIR)
    except FileNotFoundError:
        pass
    parent, name = posixpath.split(posixpath.normpath(path))
    parent_fd = _directory(ws, parent, depth)
    try:
        link = _dangling_link(parent_fd, name)
        if link is None:
            _require_owned(ws, parent_fd, path)
            os.mkdir(name, ws.parents_mode, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    if link is not None:
        if depth > 40:
            raise StartError(f"too many levels of symbolic links at {path}", EXIT_USAGE)
        return _directory(ws, posixpath.normpath(posixpath.join(parent, link)), depth + 1)
    return _resolve(ws.new, path, O_PATH_DIR)


def _dangling_link(parent_fd: int, name: str) -> str | None:
    """The target of `name` if it is a symlink (known to lead nowhere yet), else None."""
    try:
        return os.readlink(name, dir_fd=parent_fd)
    except (FileNotFoundError, OSError):
        return None


def _parent_and_name(ws: Workspace, path: str) -> tuple[int, str]:
    parent, name = posixpath.split(posixpath.normpath(path))
    return _directory(ws, parent), name


def _mount_point(ws: Workspace, path: str, directory: bool, depth: int = 0) -> int:
    """An O_PATH fd to mount on at `path`: existing, or created on an owned filesystem."""
    try:
        return _resolve(ws.new, path)
    except FileNotFoundError:
        pass
    parent, name = posixpath.split(posixpath.normpath(path))
    parent_fd = _directory(ws, parent)
    try:
        link = _dangling_link(parent_fd, name)
        if link is None:
            _require_owned(ws, parent_fd, path)
            if directory:
                os.mkdir(name, 0o755, dir_fd=parent_fd)
            else:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                                 0o444, dir_fd=parent_fd))
    finally:
        os.close(parent_fd)
    if link is not None:
        if depth > 40:
            raise StartError(f"too many levels of symbolic links at {path}", EXIT_USAGE)
        return _mount_point(ws, posixpath.normpath(posixpath.join(parent, link)), directory,
                            depth + 1)
    return _resolve(ws.new, path)


def _attach(ws: Workspace, mount_fd: int, path: str, directory: bool = True) -> None:
    target = _mount_point(ws, path, directory)
    try:
        sc.move_mount(mount_fd, target)
    finally:
        os.close(target)
        os.close(mount_fd)
    if posixpath.normpath(path) == "/" and ws.scratch_path is not None:
        # The new root itself was covered (bubblewrap's `--ro-bind / /`): from now on the
        # root is the mount on top, so reopen it by its path on the scratch.
        os.close(ws.new)
        ws.new = os.open("/newroot", O_PATH_DIR | os.O_CLOEXEC)


def _clone_tree(fd: int, attrs: int) -> int:
    """A detached recursive copy of the mount tree at `fd`, with `attrs` on every mount."""
    tree = sc.open_tree(fd, "", sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_RECURSIVE
                        | sc.AT_EMPTY_PATH)
    try:
        sc.mount_setattr(tree, attrs, recursive=True)
    except OSError:
        os.close(tree)
        raise
    return tree


def _new_tmpfs(mode: int, size: int | None = None, attrs: int = TMPFS_ATTRS) -> int:
    options = {"mode": f"{mode:o}"}
    if size is not None:
        options["size"] = str(size)
    return sc.fsmount_new("tmpfs", options, attrs)


# ---------------------------------------------------------------- operations


def _bind(ws: Workspace, op, _data) -> None:
    src = _source(ws, op.src, optional=op.try_)
    if src is None:
        return
    try:
        directory = stat.S_ISDIR(os.fstat(src).st_mode)
        _attach(ws, _clone_tree(src, BIND_ATTRS[type(op)]), op.dest, directory)
    finally:
        os.close(src)


def _bind_fd(ws: Workspace, op, _data) -> None:
    """Bind what a caller's fd refers to. The kernel does not clone mounts of another mount
    namespace through an fd, so the fd's path is looked up in the parent's view and must lead
    to the very same inode (else someone swapped it: refuse)."""
    try:
        expected = os.fstat(op.fd)
        path = _kernel_path(ws, op.fd)
    except OSError:
        raise StartError(f"fd {op.fd} is not open", EXIT_USAGE) from None
    src = _source(ws, path) if path.startswith("/") else None
    try:
        found = os.fstat(src) if src is not None else None
        if found is None or (found.st_dev, found.st_ino) != (expected.st_dev, expected.st_ino):
            raise StartError(f"fd {op.fd} ({path}) is not reachable at that path in the parent "
                             "layer's view (moved or replaced?)", EXIT_USAGE)
        _attach(ws, _clone_tree(src, BIND_ATTRS[type(op)]), op.dest,
                stat.S_ISDIR(found.st_mode))
    finally:
        if src is not None:
            os.close(src)


def _remount_ro(ws: Workspace, op, _data) -> None:
    fd = _resolve(ws.new, op.dest)
    try:
        sc.mount_setattr(fd, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV,
                         recursive=True)
    except OSError as exc:
        if exc.errno == 22:  # EINVAL: not the root of a mount
            raise StartError("is not a mount point", EXIT_USAGE) from None
        raise
    finally:
        os.close(fd)


def _tmpfs(ws: Workspace, op, _data) -> None:
    mount_fd = _new_tmpfs(op.mode, op.size)
    ws.own(mount_fd)
    _attach(ws, mount_fd, op.dest)


def _dir(ws: Workspace, op, _data) -> None:
    parent_fd, name = _parent_and_name(ws, op.dest)
    try:
        os.mkdir(name, op.mode, dir_fd=parent_fd)
    except FileExistsError:
        fd = _resolve(ws.new, op.dest)  # an existing directory keeps its mode (bubblewrap)
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        os.close(fd)
        if not is_dir:
            raise StartError("exists and is not a directory", EXIT_USAGE) from None
    finally:
        os.close(parent_fd)


def _symlink(ws: Workspace, op, _data) -> None:
    parent_fd, name = _parent_and_name(ws, op.dest)
    try:
        os.symlink(op.target_path, name, dir_fd=parent_fd)
    except FileExistsError:
        try:
            existing = os.readlink(name, dir_fd=parent_fd)
        except OSError:
            existing = None
        if existing != op.target_path:
            raise StartError(f"existing destination is {existing or 'not a symlink'}",
                             EXIT_USAGE) from None
    finally:
        os.close(parent_fd)


def _write_file(parent_fd: int, name: str, data: bytes, mode: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=parent_fd)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _file(ws: Workspace, op, data: bytes) -> None:
    parent_fd, name = _parent_and_name(ws, op.dest)
    try:
        _write_file(parent_fd, name, data, op.mode)
    finally:
        os.close(parent_fd)


def _bind_data(ws: Workspace, op, data: bytes) -> None:
    scratch = ws.scratch_fd()
    name = ws.unique("bindfile")
    _write_file(scratch, name, data, op.mode)
    attrs = BIND_ATTRS[spec.RoBind if isinstance(op, spec.RoBindData) else spec.Bind]
    try:
        tree = sc.open_tree(scratch, name, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC)
        sc.mount_setattr(tree, attrs, recursive=False)
        _attach(ws, tree, op.dest, directory=False)
    finally:
        os.unlink(name, dir_fd=scratch)


def _chmod(ws: Workspace, op, _data) -> None:
    fd = _resolve(ws.new, op.path)
    try:  # chmod through the fd's magic link: exactly the inode that was resolved
        os.chmod(f"self/fd/{fd}", op.mode, dir_fd=ws.proc_fd)
    finally:
        os.close(fd)


def _proc(ws: Workspace, op, _data) -> None:
    attrs = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC
    try:
        mount_fd = sc.fsmount_new("proc", {}, attrs)
    except PermissionError:  # the pid namespace is not ours to show: bind the parent's /proc
        src = _source(ws, "/proc")
        try:
            mount_fd = _clone_tree(src, attrs)
        finally:
            os.close(src)
    _attach(ws, mount_fd, op.dest)


def _devpts_mount() -> int:
    return sc.fsmount_new("devpts", {"newinstance": None, "ptmxmode": "0666", "mode": "620"},
                          sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)


def _dev(ws: Workspace, op, _data) -> None:
    mount_fd = _new_tmpfs(0o755)
    ws.own(mount_fd)
    _attach(ws, mount_fd, op.dest)
    for name in DEV_NODES:
        src = _source(ws, f"/dev/{name}")
        try:
            node = _clone_tree(src, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)
            _attach(ws, node, f"{op.dest}/{name}", directory=False)
        finally:
            os.close(src)
    dev_fd = _resolve(ws.new, op.dest, O_PATH_DIR)
    try:
        for name, target in DEV_LINKS.items():
            os.symlink(target, name, dir_fd=dev_fd)
    finally:
        os.close(dev_fd)
    if op.shm_tmpfs:
        shm = _new_tmpfs(0o1777)
        ws.own(shm)
        _attach(ws, shm, f"{op.dest}/shm")
    else:
        os.close(_mount_point(ws, f"{op.dest}/shm", directory=True))  # (a 0755 directory)
    _attach(ws, _devpts_mount(), f"{op.dest}/pts")


def _devpts(ws: Workspace, op, _data) -> None:
    _attach(ws, _devpts_mount(), op.dest)


def _mqueue(ws: Workspace, op, _data) -> None:
    mount_fd = sc.fsmount_new("mqueue", {}, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
                              | sc.MOUNT_ATTR_NOEXEC)
    _attach(ws, mount_fd, op.dest)


def _overlay_path(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _source_dir_path(ws: Workspace, path: str) -> str:
    fd = _source(ws, path)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise StartError(f"{path} is not a directory", EXIT_USAGE)
        return _overlay_path(_kernel_path(ws, fd))
    finally:
        os.close(fd)


def _overlay(ws: Workspace, op, _data) -> None:
    options: dict[str, str | None] = {
        "lowerdir": ":".join(_source_dir_path(ws, p) for p in op.lower)}
    attrs = TMPFS_ATTRS
    if isinstance(op, spec.Overlay):
        options["upperdir"] = _source_dir_path(ws, op.upper)
        options["workdir"] = _source_dir_path(ws, op.work)
    elif isinstance(op, spec.TmpOverlay):
        if ws.scratch_path is None:
            raise StartError("tmp-overlay needs new_root = true (its writes live on the "
                             "layer's invisible scratch tmpfs)", EXIT_USAGE)
        base = ws.unique("overlay")
        os.mkdir(base, 0o700, dir_fd=ws.scratch)
        for sub in ("upper", "work"):
            os.mkdir(f"{base}/{sub}", 0o755, dir_fd=ws.scratch)
        options["upperdir"] = posixpath.join(ws.scratch_path, base, "upper")
        options["workdir"] = posixpath.join(ws.scratch_path, base, "work")
    else:
        attrs |= sc.MOUNT_ATTR_RDONLY
    options["userxattr"] = None  # the only xattr namespace an unprivileged mount may use
    mount_fd = sc.fsmount_new("overlay", options, attrs)
    if isinstance(op, spec.TmpOverlay):
        ws.own(mount_fd)
    _attach(ws, mount_fd, op.dest)


def _mask(ws: Workspace, op, _data) -> None:
    try:
        target = _resolve(ws.new, op.path)
    except FileNotFoundError:
        return
    try:
        attrs = sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV \
            | sc.MOUNT_ATTR_NOEXEC
        if stat.S_ISDIR(os.fstat(target).st_mode):
            cover = sc.fsmount_new("tmpfs", {"mode": "0", "size": "4096", "nr_inodes": "1"},
                                   attrs)
        else:
            scratch = ws.scratch_fd()
            if ws.empty_file is None:
                ws.empty_file = ws.unique("empty")
                _write_file(scratch, ws.empty_file, b"", 0)
            cover = sc.open_tree(scratch, ws.empty_file, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC)
            sc.mount_setattr(cover, attrs, recursive=False)
        try:
            sc.move_mount(cover, target)
        finally:
            os.close(cover)
    finally:
        os.close(target)


def _squashfs(ws: Workspace, op, _data) -> None:
    """A squashfs image (or an AppImage's) mounted read-only, served by squashfuse."""
    image = _source(ws, op.src)
    try:
        readable = os.open(f"self/fd/{image}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=ws.proc_fd)
    finally:
        os.close(image)
    try:
        offset = op.offset if op.offset is not None else squashfs.image_offset(readable)
    finally:
        os.close(readable)
    fuse = squashfs.open_fuse(ws.old)
    try:
        _attach(ws, squashfs.new_mount(fuse), op.dest)
        squashfs.serve(ws.old, op.src, offset, fuse)
    finally:
        os.close(fuse)


HANDLERS = {
    spec.Bind: _bind, spec.RoBind: _bind, spec.DevBind: _bind,
    spec.BindFd: _bind_fd, spec.RoBindFd: _bind_fd,
    spec.RemountRo: _remount_ro, spec.Tmpfs: _tmpfs, spec.Dir: _dir, spec.Symlink: _symlink,
    spec.File: _file, spec.BindData: _bind_data, spec.RoBindData: _bind_data,
    spec.Chmod: _chmod, spec.Proc: _proc, spec.Dev: _dev, spec.Devpts: _devpts,
    spec.Mqueue: _mqueue, spec.Overlay: _overlay, spec.TmpOverlay: _overlay,
    spec.RoOverlay: _overlay, spec.Mask: _mask, spec.Squashfs: _squashfs,
}
