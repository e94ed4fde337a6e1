"""Purges that reach every worker of a node.

Each worker has its own memory store, and the admin API (or a PURGE request) lands on one worker. The
master creates this journal before it forks: a ring of purge records in anonymous shared memory with a
sequence number. The worker that takes a purge applies it at once and appends it; the others read records
newer than the last one they applied before their next cache lookup (one 8-byte read per lookup), so once
the purge is answered no worker serves the purged copy; idle workers also apply it on the runtime tick. A worker
that fell more than a ring behind empties its whole store rather than miss a purge.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct

SLOTS = 256
SLOT = 1024
HEADER = 8
_SEQ = struct.Struct("=Q")  # native order: also read through a memoryview (seq_view)
_RECORD = struct.Struct("<QBH")  # sequence, kind, length of the value
KINDS = {"url": 1, "prefix": 2, "tag": 3, "all": 4}
KIND_NAMES = {v: k for k, v in KINDS.items()}
MAX_VALUE = SLOT - _RECORD.size


class PurgeJournal:
    def __init__(self):
        self.mm = mmap.mmap(-1, HEADER + SLOTS * SLOT)
        self.lock = multiprocessing.Lock()
        self.seen = 0  # per process (copied at fork, then private)
        # the sequence number, read before every cache lookup: a memoryview item is the cheapest read
        self.seq_view = memoryview(self.mm)[:HEADER].cast("Q")

    def sequence(self) -> int:
        return _SEQ.unpack_from(self.mm, 0)[0]

    def publish(self, kind: str, value: str) -> int:
        data = value.encode("utf-8")
        if len(data) > MAX_VALUE:
            kind, data = "all", b""  # too long to record: the safe purge is everything
        with self.lock:
            seq = self.sequence() + 1
            offset = HEADER + (seq % SLOTS) * SLOT
            _RECORD.pack_into(self.mm, offset, seq, KINDS[kind], len(data))
            self.mm[offset + _RECORD.size: offset + _RECORD.size + len(data)] = data
            _SEQ.pack_into(self.mm, 0, seq)
            if self.seen == seq - 1:
                self.seen = seq  # the publisher applied it already
        return seq

    def pending(self) -> list[tuple[str, str]]:
        """Records this process has not applied yet (marking them applied)."""
        last = self.sequence()
        seen = self.seen
        if last == seen:
            return []
        self.seen = last
        if last - seen > SLOTS - 1:
            return [("all", "")]
        out = []
        for seq in range(seen + 1, last + 1):
            offset = HEADER + (seq % SLOTS) * SLOT
            got, kind, length = _RECORD.unpack_from(self.mm, offset)
            if got != seq:
                return [("all", "")]  # overwritten while we read: be safe
            value = bytes(self.mm[offset + _RECORD.size: offset + _RECORD.size + length]).decode("utf-8", "replace")
            out.append((KIND_NAMES.get(kind, "all"), value))
        return out
