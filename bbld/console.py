"""The wire between an app's terminal, which its monitor holds (bbld.monitors.console), and the
client showing it (bblctl.terminal): one SOCK_SEQPACKET socket per attached client, each
packet one tag byte and its payload. No imports: the client loads this on every attach.

  client -> monitor   INPUT + bytes typed      SIZE + struct winsize (8 bytes)
  monitor -> client   OUTPUT + bytes shown     NOTE + why the monitor let this client go

The monitor closes its end when the app's terminal has closed (the client has shown all of
it), or after a NOTE; a client leaves by closing its end (it is detached; the app goes on).
"""

INPUT = b"i"
SIZE = b"w"
OUTPUT = b"o"
NOTE = b"n"
PACKET = 65536 + 1  # the largest packet either side sends (a tag and 64 KiB)
