"""Run inside a sandbox by tests/test_network.py (with the system's python3): each argument is
one probe, `KIND:HOST:PORT[:N]` (an IPv6 HOST in brackets); prints one JSON object, probe ->
what happened.

  tcp:H:P       the first line the server sends, or "error ECONNREFUSED" (and how long it took)
  udp:H:P       the answer to a datagram "q", or an error
  download:H:P  [bytes received, seconds]
  upload:H:P:N  [the server's answer, seconds] after sending N bytes
  listen:P      serves "inside" on port P, forever (prints "listening" first)
  interfaces    the names of the network interfaces
"""

import errno
import json
import os
import socket
import sys
import time

TIMEOUT = 5


def tcp(host, port):
    start = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
            return conn.makefile().readline().strip()
    except OSError as exc:
        return f"error {errno.errorcode.get(exc.errno, exc.errno)} after " \
               f"{time.monotonic() - start:.1f}s"


def udp(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((host, int(port)))
            sock.send(b"q")
            return sock.recv(4096).decode()
        except OSError as exc:
            return f"error {errno.errorcode.get(exc.errno, exc.errno)}"


def download(host, port):
    start, total = time.monotonic(), 0
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        while chunk := conn.recv(1 << 16):
            total += len(chunk)
    return [total, round(time.monotonic() - start, 3)]


def upload(host, port, size):
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"x" * int(size))
        conn.shutdown(socket.SHUT_WR)
        answer = conn.makefile().readline().strip()
    return [answer, round(time.monotonic() - start, 3)]


def listen(port):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(port)))
    server.listen()
    print("listening", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"inside\n")


def main():
    found = {}
    for probe in sys.argv[1:]:
        kind, _, rest = probe.partition(":")
        if rest.startswith("["):  # an IPv6 address: KIND:[ADDRESS]:PORT[:N]
            address, _, rest = rest[1:].partition("]:")
            args = [address, *rest.split(":")]
        else:
            args = rest.split(":") if rest else []
        if kind == "interfaces":
            found[probe] = sorted(os.listdir("/sys/class/net")) if os.path.isdir(
                "/sys/class/net") else sorted(line.split(":")[0].strip() for line in
                                              open("/proc/net/dev").readlines()[2:])
        elif kind == "listen":
            listen(*args)
        else:
            found[probe] = globals()[kind](*args)
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
