"""The disk store: responses in files under one directory, shared by every worker of the node and kept
across restarts. Each worker keeps its memory store as a first level in front of it.

    <dir>/o/<ab>/<sha256(key, variant)>   one response: 4-byte head length, JSON head, then the body
    <dir>/v/<sha256(key)>                 the Vary field names of a URL whose responses vary
    <dir>/tmp/                            objects being written
    <dir>/collapse.lock                   one byte-range lock per key being fetched (request collapsing)

An object is written once per node: the first worker to create its temporary file (O_EXCL) writes it,
streaming the body as it arrives from the backend, and renames it into place at the end; a worker that
finds the temporary file already there leaves the writing to the other. Reads and writes are plain
blocking file calls (the page cache makes them cheap; hits in the memory level touch no file).
Request collapsing across the workers: the worker fetching a key holds a POSIX record lock (fcntl) on one
byte of collapse.lock, at an offset taken from the key's hash; the others see it held and wait. The kernel
drops a process's record locks when it dies, so a crashed worker never leaves a key locked, and the file
stays one empty file whatever the number of keys.
The size bound is kept by a sweep (one worker at a time, under an flock) that removes the objects used
least recently (by modification time, which a read from disk refreshes) down to 90% of the bound.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import time

from bastion.cache.memory import Entry
from bastion.cache.redis_store import dumps as _dumps_blob, loads as _loads_blob

log = logging.getLogger("bastion.cache")
_LEN = struct.Struct("<I")
SWEEP_EVERY = 10.0
STALE_TEMP = 300.0  # a temporary file older than this belongs to a writer that died


def lock_offset(key: bytes) -> int:
    """The byte of collapse.lock that stands for `key`: 62 bits of its hash (a valid file offset; two keys
    share one only by a 2^-62 chance, and then merely wait for each other)."""
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 2


def object_id(key: bytes, variant) -> str:
    digest = hashlib.sha256(key)
    if variant is not None:
        digest.update(b"\x00" + json.dumps(list(variant)).encode())
    return digest.hexdigest()


class DiskWriter:
    """One object being written; the body arrives in pieces."""

    __slots__ = ("store", "tmp", "final", "fd", "size", "failed")

    def __init__(self, store, tmp: str, final: str, fd: int):
        self.store = store
        self.tmp = tmp
        self.final = final
        self.fd = fd
        self.size = 0
        self.failed = False

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        try:
            os.write(self.fd, data)
            self.size += len(data)
        except OSError as exc:
            self.store._failed("write", exc)
            self.abort()

    def commit(self) -> None:
        if self.failed:
            return
        try:
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.final)
        except OSError as exc:
            self.store._failed("commit", exc)
            self.abort()

    def abort(self) -> None:
        self.failed = True
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


class DiskStore:
    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        self.failures = 0
        self.next_sweep = 0.0
        self.ready = False  # the folders are made at first use (not by `bastion check`)
        self.lock_fd = -1  # collapse.lock, opened by each worker at its first miss
        self.held: set[int] = set()  # lock offsets this process holds (record locks are per process)

    def _ensure(self) -> None:
        if not self.ready:
            for sub in ("o", "v", "tmp"):
                os.makedirs(os.path.join(self.path, sub), exist_ok=True)
            self.ready = True

    def _failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning("disk cache %s failed (%d so far): %s", what, self.failures, exc)

    def _object_path(self, oid: str) -> str:
        return os.path.join(self.path, "o", oid[:2], oid)

    # -- lookups ---------------------------------------------------------------------------------------------
    def get(self, key: bytes, variant_of, keep_in_file: int = 1 << 62) -> Entry | None:
        return self.lookup(key, variant_of, keep_in_file)[0]

    def lookup(self, key: bytes, variant_of, keep_in_file: int = 1 << 62) -> tuple[Entry | None, bool]:
        """The entry, with its body read, or left in the file (`entry.file`) when larger than
        `keep_in_file` bytes; and whether the URL's responses vary (so that a miss is a Vary miss)."""
        variant = None
        try:
            with open(os.path.join(self.path, "v", object_id(key, None)), "rb") as f:
                variant = variant_of(tuple(json.loads(f.read())))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            self._failed("lookup", exc)
            return None, False
        varies = variant is not None
        path = self._object_path(object_id(key, variant))
        try:
            with open(path, "rb") as f:
                (length,) = _LEN.unpack(f.read(4))
                head = f.read(length)
                body_size = os.fstat(f.fileno()).st_size - 4 - length
                in_file = body_size > keep_in_file
                body = b"" if in_file else f.read()
            os.utime(path)  # recently used: the sweep keeps it longer
        except FileNotFoundError:
            return None, varies
        except (OSError, struct.error) as exc:
            self._failed("read", exc)
            return None, varies
        try:
            entry = _loads_blob(head + b"\n" + body)
        except (ValueError, KeyError, TypeError) as exc:
            self._failed("decode", exc)
            return None, varies
        if in_file:
            entry.body = None
            entry.file = (path, 4 + length, body_size)
        return entry, varies

    # -- collapsing: one fetch per key for the node ---------------------------------------------------------
    def _lock_call(self, offset: int, mode: int) -> bool:
        if self.lock_fd < 0:
            self._ensure()
            self.lock_fd = os.open(os.path.join(self.path, "collapse.lock"), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.lockf(self.lock_fd, mode, 1, offset)
        except (BlockingIOError, PermissionError):
            return False  # another process holds it
        return True

    def try_lock(self, key: bytes) -> bool | None:
        """Become the node's fetcher of `key`: True if this process now holds its lock, False if another
        process (or another request of this one) does, None if the lock file cannot be used (then there is
        no collapsing across workers, and the caller fetches)."""
        offset = lock_offset(key)
        if offset in self.held:
            return False
        try:
            if not self._lock_call(offset, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return False
        except OSError as exc:
            self._failed("lock", exc)
            return None
        self.held.add(offset)
        return True

    def unlock(self, key: bytes) -> None:
        offset = lock_offset(key)
        if offset not in self.held:
            return
        self.held.discard(offset)
        try:
            self._lock_call(offset, fcntl.LOCK_UN)
        except OSError as exc:
            self._failed("unlock", exc)

    def is_locked(self, key: bytes) -> bool:
        """Whether some process is fetching `key` (a probe: take the lock and give it back at once; a
        worker that asks for the lock in that instant waits for a fetch that is not happening, finds the
        lock free at its next poll, a few milliseconds later, and fetches itself)."""
        offset = lock_offset(key)
        if offset in self.held:
            return True
        try:
            if not self._lock_call(offset, fcntl.LOCK_EX | fcntl.LOCK_NB):
                return True
            self._lock_call(offset, fcntl.LOCK_UN)
        except OSError as exc:
            self._failed("lock", exc)
        return False

    # -- storing ---------------------------------------------------------------------------------------------
    def begin(self, entry: Entry) -> DiskWriter | None:
        """Start writing `entry` (its head now, its body as it comes); None if another worker is on it."""
        oid = object_id(entry.key, entry.variant)
        final = self._object_path(oid)
        tmp = os.path.join(self.path, "tmp", oid)
        try:
            self._ensure()
            os.makedirs(os.path.dirname(final), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            try:
                if time.time() - os.stat(tmp).st_mtime > STALE_TEMP:
                    os.unlink(tmp)  # its writer died; the next response writes it
            except OSError:
                pass
            return None
        except OSError as exc:
            self._failed("create", exc)
            return None
        writer = DiskWriter(self, tmp, final, fd)
        head = _dumps_blob(_without_body(entry)).rstrip(b"\n")
        try:
            os.write(fd, _LEN.pack(len(head)) + head)
        except OSError as exc:
            self._failed("write", exc)
            writer.abort()
            return None
        vary_path = os.path.join(self.path, "v", object_id(entry.key, None))
        try:
            if entry.vary:
                _write_atomic(vary_path, json.dumps(list(entry.vary)).encode(), self.path)
            elif os.path.exists(vary_path):
                os.unlink(vary_path)
        except OSError as exc:
            self._failed("vary", exc)
        return writer

    def rewrite(self, entry: Entry) -> None:
        """Store `entry` whole (after a 304 refreshed its head); a body left in its file is copied over."""
        writer = self.begin(entry)
        if writer is None:
            return
        if entry.body is not None:
            writer.write(entry.body)
        elif entry.file is not None:
            path, offset, size = entry.file
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    while size > 0 and not writer.failed:
                        piece = f.read(min(size, 1 << 20))
                        if not piece:
                            break
                        writer.write(piece)
                        size -= len(piece)
            except OSError as exc:
                self._failed("copy", exc)
                writer.abort()
                return
            if size:
                writer.abort()
                return
        writer.commit()
        if entry.file is not None:
            entry.file = (writer.final, _body_offset(writer.final), entry.file[2])

    def remove(self, entry: Entry) -> None:
        try:
            os.unlink(self._object_path(object_id(entry.key, entry.variant)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._failed("remove", exc)

    # -- purge -----------------------------------------------------------------------------------------------
    def purge(self, kind: str, value: str) -> int:
        """Remove matching objects; reads each object's head (purges are rare, lookups are not)."""
        removed = 0
        for path in self._objects():
            if kind != "all":
                head = _read_head(path)
                if head is None:
                    continue
                if kind == "url" and head.get("url") != value:
                    continue
                if kind == "prefix" and not str(head.get("url", "")).startswith(value):
                    continue
                if kind == "tag" and value not in head.get("tags", ()):
                    continue
            try:
                os.unlink(path)
                removed += 1
            except OSError:
                pass
        return removed

    def _objects(self):
        root = os.path.join(self.path, "o")
        try:
            subs = list(os.scandir(root))
        except FileNotFoundError:
            return
        for sub in subs:
            if sub.is_dir():
                try:
                    for item in os.scandir(sub.path):
                        yield item.path
                except FileNotFoundError:
                    continue

    # -- size bound ------------------------------------------------------------------------------------------
    def maybe_sweep(self, now: float) -> int:
        if now < self.next_sweep:
            return 0
        self.next_sweep = now + SWEEP_EVERY
        if not os.path.isdir(self.path):
            return 0
        lock_path = os.path.join(self.path, ".sweep")
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # another worker is sweeping
            return self.sweep()

    def sweep(self) -> int:
        items = []
        total = 0
        for path in self._objects():
            try:
                st = os.stat(path)
            except OSError:
                continue
            items.append((st.st_mtime, st.st_size, path))
            total += st.st_size
        if total <= self.size:
            return 0
        items.sort()
        target = self.size * 9 // 10
        removed = 0
        for _, size, path in items:
            if total <= target:
                break
            try:
                os.unlink(path)
                total -= size
                removed += 1
            except OSError:
                pass
        return removed

    def bytes_used(self) -> int:
        total = 0
        for path in self._objects():
            try:
                total += os.stat(path).st_size
            except OSError:
                pass
        return total


def _without_body(entry: Entry) -> Entry:
    copy = Entry()
    for name in Entry.__slots__:
        setattr(copy, name, getattr(entry, name))
    copy.body = b""
    return copy


def _read_head(path: str) -> dict | None:
    try:
        with open(path, "rb") as f:
            (length,) = _LEN.unpack(f.read(4))
            return json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return None


def _write_atomic(path: str, data: bytes, root: str) -> None:
    tmp = os.path.join(root, "tmp", f"{os.path.basename(path)}.{os.getpid()}.v")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _body_offset(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return 4 + _LEN.unpack(f.read(4))[0]
    except (OSError, struct.error):
        return 0
