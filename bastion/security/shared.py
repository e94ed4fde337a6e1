"""Node-wide state shared by every worker: anonymous shared memory created in the master before the fork.

Two shapes:

- `KeyedTable`: fixed-size records found by a 64-bit key hash in buckets of `WAYS` slots. A read-modify-write
  holds an fcntl byte-range lock on the bucket (one byte per bucket of an unlinked temporary file): about
  1.5 us per lock and unlock, no contention between different buckets, and the kernel drops a lock whose
  holder dies, so a killed worker can never wedge the others (a semaphore created before fork would).
- `CounterRows`: integer counters with one row per worker process; each worker only writes its own row
  (no lock needed, single-threaded) and a reader sums the rows. The master zeroes the row of a worker that
  exits, so a crash never leaves counts behind.

Both live in the master and survive reloads (`shared_table` below returns the existing table for the same
name and shape), so limits, bans and counters carry over to the new worker generation.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile

WAYS = 4
_MASK = (1 << 64) - 1


def key_hash(key: bytes | str) -> int:
    """A non-zero 64-bit hash. Python's hash is the same in every worker: they are forked from one master
    (and one PYTHONHASHSEED); it is never used across nodes (Redis keys use the key text)."""
    h = hash(key) & _MASK
    return h or 1


class KeyedTable:
    """Records of `fmt` (which must start with the key hash 'Q') in `slots` slots."""

    def __init__(self, slots: int, fmt: str):
        self.record = struct.Struct("<" + fmt)
        self.buckets = max(1, slots // WAYS)
        self.bucket_bytes = self.record.size * WAYS
        self.map = mmap.mmap(-1, self.buckets * self.bucket_bytes)
        fd, path = tempfile.mkstemp(prefix="bastion-locks-")
        os.unlink(path)
        self.lock_fd = fd

    def bucket_of(self, h: int) -> int:
        return (h >> 7) % self.buckets

    def lock(self, bucket: int) -> None:
        fcntl.lockf(self.lock_fd, fcntl.LOCK_EX, 1, bucket)

    def unlock(self, bucket: int) -> None:
        fcntl.lockf(self.lock_fd, fcntl.LOCK_UN, 1, bucket)

    def find(self, h: int) -> tuple[int, tuple | None]:
        """(offset of the key's slot, its record) if present, else (offset of a free or the stalest slot,
        None). Staleness is the record's second field (a time): the smallest is evicted first."""
        record = self.record
        size = record.size
        base = self.bucket_of(h) * self.bucket_bytes
        victim = -1
        victim_age = None
        for offset in range(base, base + self.bucket_bytes, size):
            values = record.unpack_from(self.map, offset)
            if values[0] == h:
                return offset, values
            age = 0.0 if values[0] == 0 else values[1]
            if victim_age is None or age < victim_age:
                victim, victim_age = offset, age
        return victim, None

    def write(self, offset: int, *values) -> None:
        self.record.pack_into(self.map, offset, *values)

    def records(self):
        """Every used record (for listings; not for the hot path)."""
        record = self.record
        for offset in range(0, self.buckets * self.bucket_bytes, record.size):
            values = record.unpack_from(self.map, offset)
            if values[0]:
                yield offset, values

    def clear(self) -> None:
        self.map[:] = bytes(len(self.map))


class CounterRows:
    """`slots` counters, each kept as one int per worker row; the value is the sum over rows."""

    def __init__(self, slots: int, rows: int):
        self.slots = slots
        self.rows = rows
        self.map = mmap.mmap(-1, slots * rows * 4)
        self.view = memoryview(self.map).cast("i")
        self.row = 0  # this process's row; set in each worker after fork

    def add(self, slot: int, delta: int) -> None:
        self.view[slot * self.rows + self.row] += delta

    def total(self, slot: int) -> int:
        start = slot * self.rows
        return sum(self.view[start : start + self.rows])

    def clear_row(self, row: int) -> None:
        view, rows = self.view, self.rows
        for index in range(row, self.slots * rows, rows):
            if view[index]:
                view[index] = 0


_TABLES: dict[tuple, object] = {}
_ROWS: list[CounterRows] = []


def shared_table(name: str, slots: int, fmt: str) -> KeyedTable:
    """The master's table of this name and shape, made on first use; a reload gets the same one."""
    key = ("keyed", name, slots, fmt)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = KeyedTable(slots, fmt)
    return table


# Rows per counter table: enough for the workers of two generations (a reload overlaps them) and spares.
MAX_ROWS = 64


def shared_counters(name: str, slots: int) -> CounterRows:
    key = ("rows", name, slots)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = CounterRows(slots, MAX_ROWS)
        _ROWS.append(table)
    return table


def set_worker_row(row: int) -> None:
    """In a worker after fork: the row this process writes its counts into."""
    for table in _ROWS:
        table.row = row % table.rows


def clear_worker_row(row: int) -> None:
    """In the master when a worker exits: its counts are gone with its connections."""
    for table in _ROWS:
        table.clear_row(row % table.rows)
