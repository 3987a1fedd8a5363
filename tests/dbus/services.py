"""Two small D-Bus services for the D-Bus tests, run with /usr/bin/python3 and Debian's
python3-jeepney: on the bus at argv[1] they own org.example.X and org.example.Y, each with an
object /org/example/X (/Y) whose methods Ping, Allowed and Other answer with their names.
X's Emit makes both send the signal org.example.Signals.Changed, Y's first and only then X's:
a client that receives X's knows Y's would have come before it. Prints "ready" once both
names are owned; runs until killed."""

import select
import sys

from jeepney import (
    DBusAddress,
    HeaderFields,
    MessageType,
    new_method_call,
    new_method_return,
    new_signal,
)
from jeepney.io.blocking import open_dbus_connection

BUS = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus",
                  interface="org.freedesktop.DBus")


class Service:
    def __init__(self, address: str, letter: str):
        self.name, self.path = f"org.example.{letter}", f"/org/example/{letter}"
        self.conn = open_dbus_connection(bus=address)
        reply = self.conn.send_and_get_reply(
            new_method_call(BUS, "RequestName", "su", (self.name, 4)), timeout=10)
        assert reply.body == (1,), reply.body  # the primary owner

    def emit(self) -> None:
        """The signal, and a round trip to the bus after it: the bus handles one
        connection's messages in order, so when GetId answers, the signal has been routed."""
        self.conn.send(new_signal(DBusAddress(self.path, interface="org.example.Signals"),
                                  "Changed", "s", (self.name,)))
        self.conn.send_and_get_reply(new_method_call(BUS, "GetId"), timeout=10)

    def handle(self, others: list["Service"]) -> None:
        while True:
            try:
                msg = self.conn.receive(timeout=0)
            except TimeoutError:
                return
            if msg.header.message_type != MessageType.method_call:
                continue
            member = msg.header.fields[HeaderFields.member]
            if member == "Emit":
                for service in [*others, self]:
                    service.emit()
            self.conn.send(new_method_return(msg, "s", (f"{self.name} {member}",)))


def main(address: str) -> None:
    x, y = Service(address, "X"), Service(address, "Y")
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([x.conn.sock, y.conn.sock], [], [])
        for service in (x, y):
            if service.conn.sock in readable:
                service.handle([y] if service is x else [])


if __name__ == "__main__":
    main(sys.argv[1])
