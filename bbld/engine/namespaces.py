"""Linux namespaces as BBL names them: the one table every part of the engine reads (cloning a
layer, the namespace files a layer reports and exec/attach enter, bubblewrap's status
documents)."""

from bbld.engine import syscalls as sc

# (the spec's name, the /proc/PID/ns link, the CLONE_NEW* flag), in the order exec enters them:
# the user namespace first (it owns the others), time last (it applies to children only,
# so a layer reports and exec enters its time_for_children).
TABLE = (("user", "user", sc.CLONE_NEWUSER), ("mount", "mnt", sc.CLONE_NEWNS),
         ("pid", "pid", sc.CLONE_NEWPID), ("net", "net", sc.CLONE_NEWNET),
         ("ipc", "ipc", sc.CLONE_NEWIPC), ("uts", "uts", sc.CLONE_NEWUTS),
         ("cgroup", "cgroup", sc.CLONE_NEWCGROUP), ("time", "time_for_children", sc.CLONE_NEWTIME))

# What clone3 makes with a layer (time is unshared after the layer's view is built).
CLONE_FLAGS = {name: flag for name, _, flag in TABLE if name != "time"}
LINKS = tuple(link for _, link, _ in TABLE)  # what a layer reports, what exec may enter
LINK = {name: link for name, link, _ in TABLE}  # spec name -> link
ENTER_ORDER = tuple((link, flag) for _, link, flag in TABLE)
