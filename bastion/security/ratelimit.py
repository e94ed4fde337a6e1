"""Rate limits: GCRA per key, node-wide in shared memory (exact whatever the number of workers) or
cluster-wide in Redis (one Lua script per decision, Redis's clock for every node).

A refused request gets the limit's status (429) with Retry-After and the IETF RateLimit-Policy / RateLimit
fields (draft-ietf-httpapi-ratelimit-headers: `"name";q=COUNT;w=SECONDS` and `"name";r=REMAINING;t=SECONDS`);
allowed requests carry the same two fields. With `delay`, excess requests within the burst wait instead.
"""

from __future__ import annotations

import asyncio
import math
from time import monotonic

from bastion.config.schema import parse_rate
from bastion.proxy.exchange import Response
from bastion.security import gcra
from bastion.security.shared import key_hash

_SEP = "\x1f"


def _cookie(ex, name: str) -> str | None:
    for n, v in ex.headers:
        if len(n) == 6 and n.lower() == b"cookie":
            for part in v.split(b";"):
                k, sep, value = part.strip().partition(b"=")
                if sep and k.decode("latin-1") == name:
                    return value.decode("latin-1")
    return None


def _header(ex, lname: bytes) -> str | None:
    for n, v in ex.headers:
        if n.lower() == lname:
            return v.decode("latin-1")
    return None


def key_function(parts: list[str], client_address):
    """The key of a request as a str, or None when a part is missing (the limit does not apply then, as
    with nginx's empty keys)."""
    getters = []
    for part in parts:
        kind, _, name = part.partition(":")
        if part == "client_ip":
            getters.append(client_address.of)
        elif part == "route":
            getters.append(lambda ex: ex.route.name)
        elif part == "host":
            getters.append(lambda ex: ex.host.decode("latin-1"))
        elif part == "path":
            getters.append(lambda ex: ex.path.decode("latin-1"))
        elif kind == "header":
            lname = name.strip().lower().encode("latin-1")
            getters.append(lambda ex, lname=lname: _header(ex, lname))
        elif kind == "cookie":
            getters.append(lambda ex, name=name.strip(): _cookie(ex, name))
    if len(getters) == 1 and parts[0] == "client_ip":
        return client_address.of
    if len(getters) == 1:
        return getters[0]

    def key(ex):
        values = []
        for get in getters:
            value = get(ex)
            if value is None:
                return None
            values.append(value)
        return _SEP.join(values)

    return key


class RateLimitFilter:
    keeps_request = True  # never changes the request: the cache may keep keys per repeated head

    def __init__(self, spec, name: str, table, client_address, stats, redis_link=None):
        count, period = parse_rate(spec.rate)
        self.name = name
        self.interval = period / count
        self.tolerance = spec.burst * self.interval
        self.burst = spec.burst
        self.nodelay = spec.delay
        self.status = spec.status
        self.table = table
        self.stats = stats
        self.key = key_function(spec.key, client_address)
        self.hash_prefix = name + _SEP
        self.cluster = spec.scope == "cluster"
        self.redis = redis_link
        self.send_headers = spec.headers
        self.policy = b'"%s";q=%s;w=%d' % (name.encode("latin-1"), _num(count), int(period))
        if not spec.headers:
            self.response_filter = None  # type: ignore[assignment]  (not in the response phase at all)

    # -- the request phase --------------------------------------------------------------------------------
    def request_filter(self, ex):
        key = self.key(ex)
        if key is None:
            return None
        if self.cluster and self.redis is not None and self.redis.usable():
            return self._cluster(ex, key)
        if self.cluster and self.redis is not None and self.redis.on_error != "local":
            return self.redis.fallback_answer(ex)
        return self._local(ex, key)

    def _local(self, ex, key: str):
        table = self.table
        h = key_hash(self.hash_prefix + key)
        bucket = table.bucket_of(h)
        now = monotonic()
        table.lock(bucket)
        try:
            offset, record = table.find(h)
            allowed, tat, wait = gcra.decide(record[1] if record is not None else 0.0, now, self.interval,
                                             self.tolerance)
            if allowed:
                table.write(offset, h, tat)
        finally:
            table.unlock(bucket)
        return self._verdict(ex, allowed, tat - now, wait)

    async def _cluster(self, ex, key: str):
        try:
            allowed, wait, ahead_after = await self.redis.gcra(self.name, key, self.interval, self.tolerance)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means: fall back, as configured
            self.redis.failed(exc)
            if self.redis.on_error == "local":
                result = self._local(ex, key)
            else:
                result = self.redis.fallback_answer(ex)
            if result is not None and not isinstance(result, Response):
                result = await result
            return result
        self.redis.succeeded()
        result = self._verdict(ex, allowed, ahead_after, wait)
        if result is not None and not isinstance(result, Response):
            result = await result
        return result

    def _verdict(self, ex, allowed: bool, ahead_after: float, wait: float):
        if not allowed:
            ex.error = "rate_limited"
            self.stats.count("rate_limited")
            retry = max(1, math.ceil(wait))
            headers = [(b"Retry-After", b"%d" % retry), (b"Cache-Control", b"no-store")]
            if self.send_headers:
                headers.append((b"RateLimit-Policy", self.policy))
                headers.append((b"RateLimit", b'"%s";r=0;t=%d' % (self.name.encode("latin-1"), retry)))
            headers.append((b"Content-Type", b"text/plain; charset=utf-8"))
            return Response(self.status, b"too many requests\n", headers)
        if self.send_headers:
            left = gcra.remaining(ahead_after, 0.0, self.interval, self.tolerance)
            ex.state[self] = b'"%s";r=%d;t=%d' % (self.name.encode("latin-1"), left, gcra.reset_after(ahead_after, 0.0))
        wait = gcra.delay_for(ahead_after - self.interval, self.interval, self.nodelay)
        if wait:
            self.stats.count("rate_limit_delayed")
            return asyncio.sleep(wait)
        return None

    # -- the response phase: the fields on allowed requests --------------------------------------------------
    def response_filter(self, ex) -> None:
        state = ex._state
        if state is None:
            return
        value = state.get(self)
        if value is not None:
            headers = ex.response_headers_raw
            headers.append((b"RateLimit-Policy", self.policy))
            headers.append((b"RateLimit", value))


def _num(value: float) -> bytes:
    return b"%d" % value if float(value).is_integer() else (b"%g" % value)
