"""The partition map: which worker holds which contiguous range of partitions.

Every service reads the same versioned map (the services keep it in NATS KV). A new
assignment gets a higher version; a worker refuses work for partitions it does not
hold and names the version it holds them by.
"""

from __future__ import annotations

import msgspec

from constellation.codec import decode_json
from constellation.errors import MessageError
from constellation.tx import PARTITIONS


class PartitionMap(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    ranges: list[tuple[int, int, int]]  # (worker, lo, hi), covering 0..PARTITIONS

    @classmethod
    def even(cls, workers: int, version: int = 1) -> PartitionMap:
        """Contiguous, nearly equal ranges for workers ``0..workers-1``."""
        if not 1 <= workers <= PARTITIONS:
            raise ValueError(f"workers must be in 1..{PARTITIONS}")
        bounds = [PARTITIONS * i // workers for i in range(workers + 1)]
        return cls(version, [(w, bounds[w], bounds[w + 1]) for w in range(workers)])

    def __post_init__(self) -> None:
        at = 0
        for worker, lo, hi in sorted(self.ranges, key=lambda r: r[1]):
            if lo != at or hi <= lo or worker < 0:
                raise MessageError(f"partition map v{self.version} does not tile 0..{PARTITIONS}")
            at = hi
        if at != PARTITIONS:
            raise MessageError(f"partition map v{self.version} does not cover every partition")

    @property
    def workers(self) -> list[int]:
        return sorted({w for w, _, _ in self.ranges})

    def owners(self) -> bytes:
        """A table partition -> worker id (one byte per partition; ids below 256)."""
        table = bytearray(PARTITIONS)
        for worker, lo, hi in self.ranges:
            if worker > 255:
                raise MessageError("worker ids above 255 are not supported")
            table[lo:hi] = bytes((worker,)) * (hi - lo)
        return bytes(table)

    def held_by(self, worker: int) -> list[range]:
        return [range(lo, hi) for w, lo, hi in self.ranges if w == worker]

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


def decode_map(data: bytes) -> PartitionMap:
    return decode_json(data, PartitionMap, "partition map")
