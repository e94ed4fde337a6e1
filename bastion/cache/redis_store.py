"""The Redis store: responses shared by every worker of every Bastion node that names the same Redis.

Each worker keeps its memory store as a first level (hits there cost no round trip); a miss there asks
Redis, and what is stored goes to both. Layout, under the configured prefix P:

    P e:<sha256(key, variant)>   the entry: a JSON head line, then the body; expires when it can no longer
                                 be used (freshness + the longest stale window + a day for revalidation)
    P v:<sha256(key)>            the Vary field names of a URL whose responses vary (JSON list)
    P u:<url>, P t:<tag>         sets of entry keys, for purge by URL, prefix and tag
    P l:<sha256(key)>            held (SET NX PX collapse_timeout) by the node fetching the key: request
                                 collapsing across nodes; the value is the holder's random token
    channel P purge              purges, so that every worker of every node drops its first-level copies

Redis being slow or down never fails a request: lookups time out to a miss and stores are dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

from bastion.cache.memory import Entry

log = logging.getLogger("bastion.cache")

KEEP_FOR_REVALIDATION = 86400
# Delete the collapsing lock only if it still holds our token (compare and delete, atomically).
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def entry_id(key: bytes, variant) -> str:
    digest = hashlib.sha256(key)
    if variant is not None:
        digest.update(b"\x00" + json.dumps(list(variant)).encode())
    return digest.hexdigest()


def dumps(entry: Entry) -> bytes:
    head = {
        "key": entry.key.decode("latin-1"), "variant": list(entry.variant) if entry.variant is not None else None,
        "url": entry.url, "status": entry.status,
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers],
        "request_time": entry.request_time, "response_time": entry.response_time, "date": entry.date,
        "initial_age": entry.initial_age, "lifetime": entry.lifetime, "cc": entry.cc, "etag": entry.etag,
        "last_modified": entry.last_modified, "vary": list(entry.vary), "tags": list(entry.tags),
        "auth_ok": entry.auth_ok, "needs_check": entry.needs_check, "swr": entry.swr, "sie": entry.sie,
    }
    return json.dumps(head, separators=(",", ":")).encode() + b"\n" + entry.body


def loads(blob: bytes) -> Entry:
    line, _, body = blob.partition(b"\n")
    head = json.loads(line)
    entry = Entry()
    entry.key = head["key"].encode("latin-1")
    entry.variant = tuple(head["variant"]) if head["variant"] is not None else None
    entry.url = head["url"]
    entry.status = head["status"]
    entry.headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["headers"]]
    entry.request_time = head["request_time"]
    entry.response_time = head["response_time"]
    entry.date = head["date"]
    entry.initial_age = head["initial_age"]
    entry.lifetime = head["lifetime"]
    entry.fresh_until = entry.response_time + entry.lifetime - entry.initial_age
    entry.cc = head["cc"]
    entry.etag = head["etag"]
    entry.last_modified = head["last_modified"]
    entry.vary = tuple(head["vary"])
    entry.tags = tuple(head["tags"])
    entry.auth_ok = head["auth_ok"]
    entry.needs_check = head["needs_check"]
    entry.swr = head["swr"]
    entry.sie = head["sie"]
    entry.body = body
    entry.head_bytes = b"".join(n + b": " + v + b"\r\n" for n, v in entry.headers)
    entry.size = len(body) + len(entry.head_bytes) + len(entry.key) + 400
    return entry


class RedisStore:
    """The shared second level. Created in the master; connects lazily in each worker."""

    def __init__(self, url: str, prefix: str, timeout: float):
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.client = None
        self.subscriber: asyncio.Task | None = None
        self.failures = 0

    def _redis(self):
        if self.client is None:
            import redis.asyncio as aioredis

            self.client = aioredis.Redis.from_url(self.url, socket_timeout=self.timeout,
                                                  socket_connect_timeout=self.timeout)
        return self.client

    def _failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warning("redis cache %s failed (%d so far): %s", what, self.failures, exc)

    # -- lookups ---------------------------------------------------------------------------------------------
    async def get(self, key: bytes, variant_of) -> Entry | None:
        return (await self.lookup(key, variant_of))[0]

    async def lookup(self, key: bytes, variant_of) -> tuple[Entry | None, bool]:
        """The entry for `key`; `variant_of(names)` gives the request's variant when the URL varies; and
        whether the URL's responses vary (so that a miss is a Vary miss)."""
        r = self._redis()
        names_blob = None
        try:
            names_blob, blob = await asyncio.wait_for(
                r.mget(self.prefix + "v:" + entry_id(key, None), self.prefix + "e:" + entry_id(key, None)),
                self.timeout)
            if names_blob is not None:
                names = tuple(json.loads(names_blob))
                blob = await asyncio.wait_for(r.get(self.prefix + "e:" + entry_id(key, variant_of(names))),
                                              self.timeout)
        except Exception as exc:  # noqa: BLE001 - Redis trouble is a miss, never an error for the client
            self._failed("lookup", exc)
            return None, False
        varies = names_blob is not None
        if blob is None:
            return None, varies
        try:
            return loads(blob), varies
        except (ValueError, KeyError, TypeError) as exc:
            self._failed("decode", exc)
            return None, varies

    # -- collapsing: one fetch per key for all the nodes -----------------------------------------------------
    async def lock(self, key: bytes, token: str, ttl: float) -> bool:
        """Become the fetcher of `key` for every node (a lock that expires after `ttl` seconds, so that a
        node that died holding it blocks nobody for longer). True when this caller is to fetch: it holds
        the lock, or Redis did not answer (then there is no collapsing across nodes)."""
        try:
            got = await asyncio.wait_for(
                self._redis().set(self.prefix + "l:" + entry_id(key, None), token, nx=True,
                                  px=max(1, int(ttl * 1000))), self.timeout)
        except Exception as exc:  # noqa: BLE001
            self._failed("lock", exc)
            return True
        return bool(got)

    async def unlock(self, key: bytes, token: str, after: asyncio.Future | None = None) -> None:
        """Give the lock back (only if it is still ours: it may have expired and been taken by another),
        after `after` (the store of the fetched response) is done, so that whoever sees the lock gone
        finds the response."""
        if after is not None:
            try:
                await after
            except Exception:  # noqa: BLE001 - put() logs its own failures
                pass
        try:
            await asyncio.wait_for(self._redis().eval(_UNLOCK, 1, self.prefix + "l:" + entry_id(key, None), token),
                                   self.timeout)
        except Exception as exc:  # noqa: BLE001 - the lock then expires by itself
            self._failed("unlock", exc)

    async def is_locked(self, key: bytes) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis().exists(self.prefix + "l:" + entry_id(key, None)),
                                               self.timeout))
        except Exception as exc:  # noqa: BLE001 - Redis trouble: stop waiting
            self._failed("lock", exc)
            return False

    # -- storing ---------------------------------------------------------------------------------------------
    async def put(self, entry: Entry) -> None:
        keep = int(max(1.0, entry.fresh_until - entry.response_time) + max(entry.swr, entry.sie)) + 1
        if entry.etag is not None or entry.last_modified is not None:
            keep += KEEP_FOR_REVALIDATION
        eid = self.prefix + "e:" + entry_id(entry.key, entry.variant)
        try:
            pipe = self._redis().pipeline(transaction=False)
            pipe.set(eid, dumps(entry), ex=keep)
            vary_key = self.prefix + "v:" + entry_id(entry.key, None)
            if entry.vary:
                pipe.set(vary_key, json.dumps(list(entry.vary)), ex=keep)
            else:
                pipe.delete(vary_key)
            url_key = self.prefix + "u:" + entry.url
            pipe.sadd(url_key, eid)
            pipe.expire(url_key, max(keep, 86400))
            for tag in entry.tags:
                tag_key = self.prefix + "t:" + tag
                pipe.sadd(tag_key, eid)
                pipe.expire(tag_key, max(keep, 86400))
            await asyncio.wait_for(pipe.execute(), self.timeout * 4)
        except Exception as exc:  # noqa: BLE001
            self._failed("store", exc)

    async def remove(self, entry: Entry) -> None:
        try:
            await asyncio.wait_for(self._redis().delete(self.prefix + "e:" + entry_id(entry.key, entry.variant)),
                                   self.timeout)
        except Exception as exc:  # noqa: BLE001
            self._failed("remove", exc)

    # -- purge -----------------------------------------------------------------------------------------------
    async def purge(self, kind: str, value: str) -> int:
        """Delete from Redis and tell every worker of every node; the number of entries deleted."""
        r = self._redis()
        p = self.prefix
        try:
            if kind == "url":
                index_keys = [p + "u:" + value]
            elif kind == "tag":
                index_keys = [p + "t:" + value]
            elif kind == "prefix":
                pattern = p + "u:" + _glob_escape(value) + "*"
                index_keys = [k async for k in r.scan_iter(match=pattern, count=500)]
            else:
                index_keys = [k async for k in r.scan_iter(match=p + "*", count=500)]
                deleted = 0
                for start in range(0, len(index_keys), 500):
                    deleted += await r.delete(*index_keys[start:start + 500])
                await r.publish(p + "purge", json.dumps([kind, value]))
                return deleted
            members = set()
            for k in index_keys:
                members |= await r.smembers(k)
            deleted = 0
            if members:
                deleted = await r.exists(*members)
                await r.delete(*members)
            if index_keys:
                await r.delete(*index_keys)
            await r.publish(p + "purge", json.dumps([kind, value]))
            return deleted
        except Exception as exc:  # noqa: BLE001
            self._failed("purge", exc)
            return 0

    def subscribe(self, apply) -> None:
        """Listen for purges from other nodes (once per worker); `apply(kind, value)` drops local copies."""
        if self.subscriber is not None and not self.subscriber.done():
            return
        self.subscriber = asyncio.get_event_loop().create_task(self._listen(apply))

    async def _listen(self, apply) -> None:
        import redis.asyncio as aioredis

        while True:
            client = aioredis.Redis.from_url(self.url)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(self.prefix + "purge")
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        kind, value = json.loads(message["data"])
                    except (ValueError, TypeError):
                        continue
                    apply(kind, value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect after a pause
                self._failed("subscription", exc)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001
                    pass


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
