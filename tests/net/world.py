"""A private network world for the network tests, made by the test user alone.

    python -m tests.net.world [--tun-0600] DIRECTORY...

It makes a user namespace (the user mapped to itself) and a network namespace, "the host",
where the test's bbld will run; and a second network namespace, "the remote host", joined to
it by a veth pair: the host is 198.18.0.2/30 and 2001:db8::2/64 with its default routes
through the remote, 198.18.0.1 and 2001:db8::1, which also holds 10.99.0.1 and fd99::1
(private addresses, for deny_local). Nothing outside is ever contacted: the world has no
other way out.

Servers, each answering its own name and closing (unless said otherwise):
  remote  tcp 7001 "remote-7001", tcp 7002 "remote-7002" (both also on IPv6),
          tcp 7003: 1 MiB then close, tcp 7004: reads to EOF, answers "got N";
          udp 7005 and 53: "echo:" + the datagram
  host    127.0.0.1 tcp 7010 "host-7010", tcp 7011 "host-7011"; 10.98.0.1 (on the host's lo,
          an address of the host that the NAT does not copy inside; and 2001:db8:1::1) tcp 7012
          "host-self"

Its mount namespace has a root of its own (a tmpfs of the user's) with the system's
directories and the DIRECTORIES (the test's, the virtualenv, the sources) bound at their
places: in a user namespace that does not map the host's root, / and /tmp would belong to
the overflow uid, and BBL trusts no directory on the way to its files that someone else may
own. With --tun-0600 a file nobody may open lies over /dev/net/tun, as on servers where the
device is root-only (0600).

It prints "ready PID" once everything answers, and ends (with the remote host) when its
stdin closes. Tests enter it with nsenter --user --net [--mount] --preserve-credentials.
"""

import os
import socket
import sys
import threading

from pyroute2 import IPRoute

from bbld.engine import syscalls as sc

REMOTE, HOST, PRIVATE, HOST_SELF = "198.18.0.1", "198.18.0.2", "10.99.0.1", "10.98.0.1"
# IPv6 the same way: documentation addresses on the veth, a ULA as the remote's private one
REMOTE6, HOST6, PRIVATE6, HOST_SELF6 = "2001:db8::1", "2001:db8::2", "fd99::1", "2001:db8:1::1"
IFA_F_NODAD = 0x02  # (no duplicate address detection: usable at once)
MIB = 1 << 20


def main() -> None:
    tun_0600 = "--tun-0600" in sys.argv[1:]
    directories = [a for a in sys.argv[1:] if not a.startswith("--")]
    uid, gid = os.getuid(), os.getgid()
    sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNET | sc.CLONE_NEWNS)
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _own_root(directories, tun_0600)
    remote_ready_r, remote_ready_w = os.pipe()
    go_r, go_w = os.pipe()
    remote = os.fork()
    if remote == 0:
        os.close(remote_ready_r)
        os.close(go_w)
        _remote_host(go_r, remote_ready_w)
        os._exit(0)
    os.close(remote_ready_w)
    os.close(go_r)
    with IPRoute() as ipr:
        _up(ipr, "lo")
        ipr.addr("add", index=_index(ipr, "lo"), address=HOST_SELF, prefixlen=32)
        ipr.addr("add", index=_index(ipr, "lo"), address=HOST_SELF6, prefixlen=128,
                 flags=IFA_F_NODAD)
        ipr.link("add", ifname="veth-h", kind="veth", peer="veth-r")
        ipr.link("set", index=_index(ipr, "veth-r"), net_ns_pid=remote)
        os.write(go_w, b"1")
        assert os.read(remote_ready_r, 1) == b"1", "the remote host failed"
        veth = _index(ipr, "veth-h")
        ipr.link("set", index=veth, mtu=1500, state="up")
        ipr.addr("add", index=veth, address=HOST, prefixlen=30)
        ipr.addr("add", index=veth, address=HOST6, prefixlen=64, flags=IFA_F_NODAD)
        ipr.route("add", dst="0.0.0.0/0", gateway=REMOTE)
        ipr.route("add", dst="::/0", gateway=REMOTE6, family=socket.AF_INET6)
    for address, port, reply in (("127.0.0.1", 7010, b"host-7010\n"),
                                 ("127.0.0.1", 7011, b"host-7011\n"),
                                 (HOST_SELF, 7012, b"host-self\n"),
                                 (HOST_SELF6, 7012, b"host-self\n")):
        _serve_tcp(address, port, lambda conn, reply=reply: conn.sendall(reply))
    print(f"ready {os.getpid()}", flush=True)
    sys.stdin.read()
    os.kill(remote, 9)
    os.waitpid(remote, 0)


def _remote_host(go_r: int, ready_w: int) -> None:
    sc.unshare(sc.CLONE_NEWNET)
    assert os.read(go_r, 1) == b"1"
    with IPRoute() as ipr:
        _up(ipr, "lo")
        for address in (PRIVATE, *_resolvers()):
            ipr.addr("add", index=_index(ipr, "lo"), address=address, prefixlen=32)
        ipr.addr("add", index=_index(ipr, "lo"), address=PRIVATE6, prefixlen=128,
                 flags=IFA_F_NODAD)
        veth = _index(ipr, "veth-r")
        ipr.link("set", index=veth, mtu=1500, state="up")
        ipr.addr("add", index=veth, address=REMOTE, prefixlen=30)
        ipr.addr("add", index=veth, address=REMOTE6, prefixlen=64, flags=IFA_F_NODAD)
    for port in (7001, 7002):
        for address in ("0.0.0.0", "::"):
            _serve_tcp(address, port,
                       lambda conn, p=port: conn.sendall(f"remote-{p}\n".encode()))
    _serve_tcp("0.0.0.0", 7003, lambda conn: conn.sendall(b"x" * MIB))
    _serve_tcp("0.0.0.0", 7004, _count)
    _serve_udp_echo(7005)
    _serve_udp_echo(53)  # (a name server's port: NATs treat it apart)
    os.write(ready_w, b"1")
    threading.Event().wait()


def _resolvers() -> list[str]:
    """The real host's first IPv4 name server, unless on its loopback: the remote host holds
    its address (and answers on port 53), so that an app asking the host's resolver gets an
    answer in the world."""
    from bbld import net

    found = [a for a in net.nameservers(net.RESOLV_CONF) if "." in a]
    return [a for a in found[:1] if not a.startswith("127.")]


def _count(conn: socket.socket) -> None:
    total = 0
    while chunk := conn.recv(1 << 16):
        total += len(chunk)
    conn.sendall(f"got {total}\n".encode())


def _serve_tcp(address: str, port: int, handle) -> None:
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in address:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((address, port))
    listener.listen(16)

    def loop():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_handle, args=(conn, handle), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def _handle(conn: socket.socket, handle) -> None:
    with conn:
        try:
            handle(conn)
        except OSError:
            pass


def _serve_udp_echo(port: int) -> None:
    """On each address of its own: an answer from 0.0.0.0 would leave from the address the
    route picks, which a client's connected socket does not take for the answer."""
    for address in (REMOTE, PRIVATE, *_resolvers()):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind((address, port))

        def loop(server=server):
            while True:
                data, peer = server.recvfrom(4096)
                server.sendto(b"echo:" + data, peer)

        threading.Thread(target=loop, daemon=True).start()


def _own_root(directories: list[str], tun_0600: bool) -> None:
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    root = "/mnt"  # (over it in our mount namespace only: nothing to remove on the host)
    sc.mount("tmpfs", root, "tmpfs", 0, "mode=0755")
    for path in ("/usr", "/etc", "/proc", "/dev", "/sys", *directories):
        if os.path.isdir(path):
            os.makedirs(root + path, mode=0o755, exist_ok=True)
            sc.mount(path, root + path, None, sc.MS_BIND | sc.MS_REC)
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if os.path.islink(f"/{name}"):
            os.symlink(os.readlink(f"/{name}"), f"{root}/{name}")
        elif os.path.isdir(f"/{name}"):
            os.makedirs(f"{root}/{name}")
            sc.mount(f"/{name}", f"{root}/{name}", None, sc.MS_BIND | sc.MS_REC)
    os.makedirs(f"{root}/tmp", exist_ok=True)
    os.chmod(f"{root}/tmp", 0o1777)
    if tun_0600:
        fake = f"{root}/tmp/fake-tun"
        os.close(os.open(fake, os.O_CREAT | os.O_WRONLY, 0o000))
        sc.mount(fake, f"{root}/dev/net/tun", None, sc.MS_BIND)
    os.chdir(root)
    os.mkdir("old")
    sc.pivot_root(".", "old")
    sc.umount2("/old", sc.MNT_DETACH)
    os.rmdir("/old")
    os.chdir("/")


def _up(ipr: IPRoute, name: str) -> None:
    ipr.link("set", index=_index(ipr, name), state="up")


def _index(ipr: IPRoute, name: str) -> int:
    return ipr.link_lookup(ifname=name)[0]


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
