"""Varlink's framing: a message is one JSON text and a NUL byte. Shared by bbld (through
bbld.protocol) and the client, which must stay light: this module imports nothing."""

MAX_MESSAGE = 1 << 20  # bytes; what bbld accepts in one message


class FrameTooLarge(Exception):
    pass


class Framer:
    """Splits a byte stream into NUL-terminated messages, refusing oversized ones."""

    def __init__(self, limit: int = MAX_MESSAGE):
        self.limit = limit
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        frames = []
        while (end := self.buffer.find(b"\0")) >= 0:
            if end > self.limit:
                break
            frames.append(bytes(self.buffer[:end]))
            del self.buffer[:end + 1]
        if len(self.buffer) > self.limit:  # an oversized message, ended or not
            raise FrameTooLarge(f"message larger than {self.limit} bytes")
        return frames
