"""Length-prefixed protobuf messages on a stream socket or pipe, bounded in size."""
import socket
import struct

from ..errors import HpcckptError

MAX_FRAME = 1 << 20
VERSION = 2      # of hpcckptd's protocol (service.proto); 2: migrated files follow raw, not in frames
_LEN = struct.Struct("<I")


class ProtocolError(HpcckptError):
    """A peer sent something that is not a well-formed, bounded message."""


def encode(msg) -> bytes:
    payload = msg.SerializeToString()
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"message of {len(payload)} bytes is over the {MAX_FRAME}-byte limit")
    return _LEN.pack(len(payload)) + payload


def decode(cls, payload: bytes):
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except Exception as e:  # DecodeError and friends: never let them crash the daemon
        raise ProtocolError(f"malformed {cls.__name__}: {e}") from None
    return msg


def _read_exact(read, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = read(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError(f"connection closed in the middle of a frame ({len(buf)} of {n} bytes)")
            return None
        buf += chunk
    return buf


def read_frame(read) -> bytes | None:
    """One frame's payload, None at a clean end of stream."""
    head = _read_exact(read, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes announced, over the {MAX_FRAME}-byte limit")
    payload = _read_exact(read, n)
    if payload is None:
        raise ProtocolError("connection closed after a frame header")
    return payload


def sock_reader(sock: socket.socket):
    return lambda n: sock.recv(n)
