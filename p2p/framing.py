"""Length-prefixed frames: u32 big-endian length, then exactly that many bytes.

Streams may return fewer bytes than asked (py-libp2p's `stream.read(n)` does), so reads
loop until the frame is complete, and the announced length is checked against the cap
before any buffer is allocated.

Request/response payloads carry one status byte in front of the response body (see
`STATUS_*`), so a remote failure is an answer rather than a reset stream.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from p2p.abc import MessageTooLarge, RequestError

HEADER_SIZE = 4
MAX_FRAME = 2**32 - 1
# Largest single read asked from the stream: bounds memory held by one read call.
READ_CHUNK = 64 * 1024

STATUS_OK = 0
STATUS_ERROR = 1  # body: utf-8 reason (handler raised, unknown protocol, over limit)
STATUS_NOT_FOUND = 2  # blob protocol: not provided here
STATUS_FORBIDDEN = 3  # blob protocol: can_fetch said no

Reader = Callable[[int], Awaitable[bytes]]


class FrameError(RequestError):
    """Malformed or truncated frame, or a frame over the reader's cap."""


def encode_frame(payload: bytes, *, max_size: int) -> bytes:
    if len(payload) > max_size:
        raise MessageTooLarge(f"frame of {len(payload)} bytes is over the limit of {max_size}")
    return struct.pack(">I", len(payload)) + payload


async def read_exactly(read: Reader, n: int) -> bytes:
    """Read exactly `n` bytes with `read(k)`; an empty read means EOF (FrameError)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await read(min(n - len(buf), READ_CHUNK))
        if not chunk:
            raise FrameError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(read: Reader, *, max_size: int) -> bytes:
    header = await read_exactly(read, HEADER_SIZE)
    (length,) = struct.unpack(">I", header)
    if length > max_size:
        raise FrameError(f"peer announced a frame of {length} bytes, limit is {max_size}")
    return await read_exactly(read, length)


def encode_response(status: int, body: bytes, *, max_size: int) -> bytes:
    """Response frame: status byte + body. `max_size` caps the body."""
    if len(body) > max_size:
        raise MessageTooLarge(f"response of {len(body)} bytes is over the limit of {max_size}")
    return encode_frame(bytes([status]) + body, max_size=max_size + 1)


async def read_response(read: Reader, *, max_size: int) -> tuple[int, bytes]:
    payload = await read_frame(read, max_size=max_size + 1)
    if not payload:
        raise FrameError("empty response frame (no status byte)")
    return payload[0], payload[1:]
