"""A bounded reader for the project's fixed binary layouts (big-endian, no varints), and
the reading of its small JSON documents.

Every read checks the remaining length, so truncated input is a ``Truncated`` error
rather than an exception from ``struct``; ``finish`` rejects trailing bytes.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import msgspec

from constellation.errors import CountOutOfRange, MessageError, TrailingBytes, Truncated

T = TypeVar("T")

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """Reads a byte string front to back; raises a typed ``DecodeError`` on bad input."""

    __slots__ = ("_data", "_pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self.what = what

    def _need(self, n: int) -> int:
        pos = self._pos
        if pos + n > len(self._data):
            raise Truncated(f"{self.what}: needs {pos + n} bytes, got {len(self._data)}")
        self._pos = pos + n
        return pos

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end), not consumed."""
        return self._data[self._pos : self._pos + n]

    def bytes(self, n: int) -> bytes:
        pos = self._need(n)
        return self._data[pos : pos + n]

    def u8(self) -> int:
        return self._data[self._need(1)]

    def u16(self) -> int:
        return int(_U16.unpack_from(self._data, self._need(2))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self._data, self._need(8))[0])

    def count(self, lo: int, hi: int, of: str) -> int:
        """A u16 element count that must lie in ``lo..hi``."""
        n = self.u16()
        if not lo <= n <= hi:
            raise CountOutOfRange(f"{self.what}: {n} {of}, allowed {lo}..{hi}")
        return n

    def finish(self) -> None:
        if self._pos != len(self._data):
            extra = len(self._data) - self._pos
            raise TrailingBytes(f"{self.what}: {extra} bytes after the end")


def u16(n: int) -> bytes:
    return _U16.pack(n)


def u32(n: int) -> bytes:
    return _U32.pack(n)


def u64(n: int) -> bytes:
    return _U64.pack(n)


def decode_json(data: bytes, kind: type[T], what: str) -> T:
    """A JSON document of ``kind`` (a struct, checked as it is read), or a
    ``MessageError`` that names ``what`` and says why not."""
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise MessageError(f"bad {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MessageError(f"{what} is not JSON: {exc}") from None
