"""Bans and auto-ban (what fail2ban does, built in).

The ban list is a node-wide shared-memory table (key hash, until as wall-clock time, the address text), so a
ban holds on every worker the moment it is written. With Redis configured, bans also go to a sorted set
that every worker mirrors on its one-second tick, so they hold on every node within about a second.

`AutoBan` is a log-phase filter: it looks only at `exchange.status` and `exchange.error`, so the filters
whose refusals it counts (rate limits, the WAF) need to know nothing about it. Counted events:
  4xx            any answer with a 4xx status (including the ones below)
  waf_blocked    exchange.error == "waf_blocked"
  rate_limited   exchange.error == "rate_limited"
Requests refused because of a ban or an access list are not counted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import time
from time import monotonic

from bastion.proxy.exchange import Response
from bastion.security.shared import key_hash, shared_table

log = logging.getLogger("bastion.security")

_LATEST = struct.Struct("<Qd")
_NOT_COUNTED = frozenset({"banned", "access_denied"})


def normalize_ip(text: str) -> str:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


BAN_SLOTS = 8192  # bans are few; a small table keeps listings and reconciliations cheap
_RECONCILE_AFTER = 3.0  # a local ban this young may still be on its way to Redis


class BanList:
    """Records: key hash, until (wall clock), since (wall clock), shared (1 once Redis has it), address."""

    def __init__(self, slots: int, stats, redis_link=None):
        self.table = shared_table("bans", min(slots, BAN_SLOTS), "QddB39s")
        # A node-wide "latest end of any ban": while it is in the past, checking costs one read.
        self.latest = shared_table("bans-latest", 4, "Qd")
        self.stats = stats
        self.redis = redis_link
        self._syncing = False
        self._seen_version = None  # this worker's last view of the cluster's ban list
        self._unshared: dict[str, float] = {}  # bans this worker could not write to Redis yet

    def _latest(self) -> float:
        return _LATEST.unpack_from(self.latest.map, 0)[1]

    def is_banned(self, ip: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now >= self._latest():
            return False
        h = key_hash(ip)
        _, record = self.table.find(h)
        return record is not None and record[1] > now

    def ban(self, ip: str, seconds: float, reason: str = "", share: bool = True) -> float:
        ip = normalize_ip(ip)
        until = time.time() + seconds
        self._store(ip, until, 0)
        self.stats.count("bans_added")
        log.warning("banned %s for %ds%s", ip, int(seconds), f": {reason}" if reason else "")
        if share and self.redis is not None:
            self._unshared[ip] = until
            self._spawn(self._share())
        return until

    def _store(self, ip: str, until: float, shared: int) -> None:
        table = self.table
        h = key_hash(ip)
        bucket = table.bucket_of(h)
        table.lock(bucket)
        try:
            offset, record = table.find(h)
            if record is None or record[1] < until:
                table.write(offset, h, until, time.time(), shared, ip.encode()[:39])
            elif shared and not record[3]:
                table.write(offset, h, record[1], record[2], 1, record[4])
        finally:
            table.unlock(bucket)
        self.latest.lock(0)
        try:
            if self._latest() < until:
                _LATEST.pack_into(self.latest.map, 0, 1, until)
        finally:
            self.latest.unlock(0)

    def lift(self, ip: str) -> bool:
        ip = normalize_ip(ip)
        table = self.table
        h = key_hash(ip)
        bucket = table.bucket_of(h)
        table.lock(bucket)
        try:
            offset, record = table.find(h)
            found = record is not None and record[1] > time.time()
            if record is not None:
                table.write(offset, 0, 0.0, 0.0, 0, b"")
        finally:
            table.unlock(bucket)
        self._unshared.pop(ip, None)
        return found

    def _local(self) -> list[tuple[str, float, float, int]]:
        now = time.time()
        return [(text.rstrip(b"\0").decode(), until, since, shared)
                for _, (h, until, since, shared, text) in self.table.records() if until > now]

    def listing(self) -> list[dict]:
        now = time.time()
        return sorted(({"ip": ip, "until": round(until, 3), "remaining_seconds": round(until - now, 1)}
                       for ip, until, _, _ in self._local()), key=lambda b: b["ip"])

    # -- Redis ----------------------------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        try:
            asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()  # no loop (bastion check, the master): nothing to share with

    async def _share(self) -> None:
        for ip, until in list(self._unshared.items()):
            try:
                await self.redis.add_ban(ip, until)
                self.redis.succeeded()
            except Exception as exc:  # noqa: BLE001 - kept, and written on a later tick
                self.redis.failed(exc)
                return
            if self._unshared.get(ip) == until:
                del self._unshared[ip]
            self._store(ip, until, 1)

    async def lift_everywhere(self, ip: str) -> bool:
        if self.redis is not None:
            try:
                await self.redis.remove_ban(normalize_ip(ip))
                self.redis.succeeded()
            except Exception as exc:  # noqa: BLE001
                self.redis.failed(exc)
        return self.lift(ip)

    def sync(self) -> None:
        """On the worker's tick: mirror the cluster's bans into the node's table."""
        if self.redis is None or self._syncing or not self.redis.usable():
            return
        self._syncing = True
        self._spawn(self._pull())

    async def _pull(self) -> None:
        try:
            if self._unshared:
                await self._share()
            version = await self.redis.bans_version()
            if version == self._seen_version:
                return
            bans = dict(await self.redis.active_bans())
            self.redis.succeeded()
        except Exception as exc:  # noqa: BLE001
            self.redis.failed(exc)
            return
        finally:
            self._syncing = False
        self._seen_version = version
        now = time.time()
        local = {ip: (until, since, shared) for ip, until, since, shared in self._local()}
        for ip, until in bans.items():
            mine = local.get(ip)
            if mine is None or mine[0] < until or not mine[2]:
                self._store(ip, until, 1)
        for ip, (until, since, shared) in local.items():
            # A ban Redis had and no longer has was lifted on another node. One written a moment ago may
            # have reached Redis after our read: look again on a later tick.
            if shared and ip not in bans:
                if now - since > _RECONCILE_AFTER:
                    self.lift(ip)
                else:
                    self._seen_version = None


def banned_response(status: int = 403) -> Response:
    return Response(status, "banned\n", {"Cache-Control": "no-store"}, content_type="text/plain; charset=utf-8")


class AutoBan:
    """The log-phase counter that bans clients crossing a threshold within the window."""

    def __init__(self, spec, bans: BanList, client_address, slots: int):
        self.bans = bans
        self.client_address = client_address
        self.window = spec.window
        self.ban_time = spec.ban_time
        self.limits = {kind: n for kind, n in (("4xx", spec.max_4xx), ("waf_blocked", spec.max_waf_blocks),
                                               ("rate_limited", spec.max_rate_limited)) if n is not None}
        self.count_4xx = "4xx" in self.limits
        self.events = shared_table("ban-events", slots, "Qdi4x")

    def logging(self, ex) -> None:
        status = ex.status
        error = ex.error
        if not (400 <= status < 500) and error is None:
            return
        if error in _NOT_COUNTED:
            return
        kinds = []
        if self.count_4xx and 400 <= status < 500:
            kinds.append("4xx")
        if error in self.limits:
            kinds.append(error)
        if not kinds:
            return
        ip = self.client_address.of(ex)
        for kind in kinds:
            if self._count(ip, kind) >= self.limits[kind]:
                self.bans.ban(ip, self.ban_time, f"{self.limits[kind]} {kind} in {int(self.window)}s")
                self._reset(ip, kind)
                break

    def _count(self, ip: str, kind: str) -> int:
        table = self.events
        h = key_hash(kind + "\x1f" + ip)
        bucket = table.bucket_of(h)
        now = monotonic()
        table.lock(bucket)
        try:
            offset, record = table.find(h)
            if record is None or now - record[1] >= self.window:
                count, start = 1, now
            else:
                count, start = record[2] + 1, record[1]
            table.write(offset, h, start, count)
        finally:
            table.unlock(bucket)
        return count

    def _reset(self, ip: str, kind: str) -> None:
        table = self.events
        h = key_hash(kind + "\x1f" + ip)
        bucket = table.bucket_of(h)
        table.lock(bucket)
        try:
            offset, record = table.find(h)
            if record is not None:
                table.write(offset, 0, 0.0, 0)
        finally:
            table.unlock(bucket)
