"""The link from one worker to the cluster's Redis: cluster-wide rate limits (one Lua script per decision,
timed by Redis's own clock so every node agrees) and the shared ban list.

When Redis cannot be reached the worker falls back (local limits, open, or closed, as configured) for
`retry_interval`, then tries again. The outage is logged once when it starts and once when it ends, never
per request.
"""

from __future__ import annotations

import logging
import time
from time import monotonic

from bastion.proxy.exchange import Response

log = logging.getLogger("bastion.security")

# KEYS[1] the key; ARGV interval and tolerance in microseconds. Returns {allowed, wait_us, ahead_after_us}.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance then
  return {0, string.format('%.0f', ahead - tolerance), string.format('%.0f', ahead)}
end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return {1, '0', string.format('%.0f', new - now)}
"""


class RedisLink:
    def __init__(self, settings, stats):
        self.settings = settings
        self.prefix = settings.prefix
        self.on_error = settings.on_error
        self.stats = stats
        self._client = None
        self._script = None
        self.down_until = 0.0
        self.down = False

    def client(self):
        """Made lazily in the worker (after fork): a connection pool must not be shared across processes."""
        if self._client is None:
            import redis.asyncio as aioredis

            t = self.settings.timeout
            self._client = aioredis.Redis.from_url(self.settings.url, socket_timeout=t, socket_connect_timeout=t,
                                                   retry_on_timeout=False)
            self._script = self._client.register_script(GCRA_SCRIPT)
        return self._client

    def usable(self) -> bool:
        return not self.down or monotonic() >= self.down_until

    def failed(self, exc: Exception) -> None:
        self.down_until = monotonic() + self.settings.retry_interval
        if not self.down:
            self.down = True
            self.stats.count("redis_fallback")
            log.warning("redis %s unreachable (%s); using %s until it answers again", self.settings.url,
                        exc.__class__.__name__, {"local": "node-local limits", "open": "no limits (fail-open)",
                                                 "closed": "503 for limited requests (fail-closed)"}[self.on_error])

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            log.warning("redis %s reachable again; cluster-wide limits resumed", self.settings.url)

    def fallback_answer(self, ex):
        if self.on_error == "open":
            return None
        ex.error = "rate_limit_unavailable"
        return Response(503, "rate limit store unavailable\n", {"Retry-After": "1", "Cache-Control": "no-store"},
                        content_type="text/plain; charset=utf-8")

    async def gcra(self, name: str, key: str, interval: float, tolerance: float) -> tuple[bool, float, float]:
        self.client()
        result = await self._script(keys=[f"{self.prefix}rl:{name}:{key}"],
                                    args=[int(interval * 1e6), int(tolerance * 1e6)])
        allowed, wait, ahead = result
        return bool(int(allowed)), int(wait) / 1e6, int(ahead) / 1e6

    # -- bans ---------------------------------------------------------------------------------------------
    @property
    def bans_key(self) -> str:
        return self.prefix + "bans"

    async def add_ban(self, ip: str, until: float) -> None:
        client = self.client()
        async with client.pipeline(transaction=True) as pipe:
            await pipe.zadd(self.bans_key, {ip: until}).incr(self.bans_key + ":version").execute()

    async def remove_ban(self, ip: str) -> None:
        async with self.client().pipeline(transaction=True) as pipe:
            await pipe.zrem(self.bans_key, ip).incr(self.bans_key + ":version").execute()

    async def bans_version(self):
        """Changes whenever a ban is added or lifted anywhere; expired bans need no notice."""
        return await self.client().get(self.bans_key + ":version")

    async def active_bans(self) -> list[tuple[str, float]]:
        client = self.client()
        now = time.time()
        await client.zremrangebyscore(self.bans_key, "-inf", now)
        pairs = await client.zrangebyscore(self.bans_key, now, "+inf", withscores=True)
        return [(ip.decode() if isinstance(ip, bytes) else ip, float(score)) for ip, score in pairs]
