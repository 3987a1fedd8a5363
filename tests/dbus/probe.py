"""Run inside a sandbox by the D-Bus tests (/usr/bin/python3, python3-jeepney): what the app
can do on a bus, printed as one JSON object. argv: the bus address (or "session", "system"),
then host sockets that must stay out of reach ("path:/…" or "abstract:NAME")."""

import json
import os
import socket
import sys

from jeepney import DBusAddress, HeaderFields, MatchRule, MessageType, new_method_call
from jeepney.io.blocking import open_dbus_connection

BUS = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                  interface="org.freedesktop.DBus")


def call(conn, address, method, signature=None, body=()):
    reply = conn.send_and_get_reply(new_method_call(address, method, signature, body),
                                    timeout=10)
    if reply.header.message_type == MessageType.error:
        return "error " + reply.header.fields[HeaderFields.error_name]
    return reply.body[0] if len(reply.body) == 1 else list(reply.body)


def service(letter: str) -> DBusAddress:
    return DBusAddress(f"/org/example/{letter}", bus_name=f"org.example.{letter}",
                       interface=f"org.example.{letter}")


def on_the_bus(bus: str) -> dict:
    found = {}
    with open_dbus_connection(bus=bus.upper() if bus in ("session", "system") else bus) as conn:
        found["names"] = sorted(n for n in call(conn, BUS, "ListNames") if n[0] != ":")
        found["has Y"] = call(conn, BUS, "NameHasOwner", "s", ("org.example.Y",))
        for letter in "XY":
            for method in ("Ping", "Allowed", "Other"):
                found[f"{letter}.{method}"] = call(conn, service(letter), method)
        found["own org.example.App.Sub"] = call(conn, BUS, "RequestName", "su",
                                                ("org.example.App.Sub", 4))
        found["own org.example.Other"] = call(conn, BUS, "RequestName", "su",
                                              ("org.example.Other", 4))
        signals = MatchRule(type="signal", interface="org.example.Signals")
        call(conn, BUS, "AddMatch", "s", (signals.serialise(),))
        with conn.filter(signals, bufsize=10) as queue:
            found["emit"] = call(conn, service("X"), "Emit")
            heard = []
            while found["emit"] == "org.example.X Emit" and "org.example.X" not in heard:
                heard.append(conn.recv_until_filtered(queue, timeout=10).body[0])
            found["signals"] = heard
    with open_dbus_connection(bus=bus.upper() if bus in ("session", "system") else bus) as conn:
        monitoring = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                                 interface="org.freedesktop.DBus.Monitoring")
        found["monitor"] = call(conn, monitoring, "BecomeMonitor", "asu", ([], 0))
    return found


def reachable(target: str) -> bool:
    kind, _, name = target.partition(":")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(name if kind == "path" else "\0" + name)
            return True
        except OSError:
            return False


def main(bus: str, *hidden: str) -> None:
    found = {"variables": {k: v for k, v in os.environ.items() if k.startswith("DBUS_")},
             "reachable": [target for target in hidden if reachable(target)]}
    if bus != "none":
        found.update(on_the_bus(bus))
    print(json.dumps(found))


if __name__ == "__main__":
    main(*sys.argv[1:])
