"""The client's Varlink wire: JSON text over a Unix stream socket (the fds that travel with
it: bbld.channel).

Built on CPython's C modules (_json, _socket, _signal) rather than json, socket and signal:
those three import enum and re, which takes longer than all the rest of a `bblctl exec`
(docs/performance.md). Where the C modules are missing (another
Python implementation) the standard modules do the same job.
"""


try:
    import _json
    import _signal as signal
    import _socket as socket
except ImportError:  # not CPython: the same names from the standard modules
    _json = None
    import signal
    import socket

__all__ = ["dumps", "loads", "signal", "unix_socket", "ProtocolError"]


class ProtocolError(Exception):
    """What came is not JSON (or not all of it is)."""


if _json is not None:
    class _Options:
        """What _json's scanner reads from json.JSONDecoder: the defaults."""
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = float

    _scan = _json.make_scanner(_Options())
    _encode = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",",
                                 False, False, False)

    def dumps(value) -> str:
        return "".join(_encode(value, 0))

    def loads(text: str):
        try:
            value, end = _scan(text, 0)
        except (StopIteration, ValueError) as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        if end != len(text):
            raise ProtocolError(f"not JSON: extra data at {end}")
        return value
else:
    import json

    def dumps(value) -> str:
        return json.dumps(value, separators=(",", ":"))

    def loads(text: str):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"not JSON: {exc}") from None


def unix_socket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
