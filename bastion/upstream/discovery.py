"""Service discovery: upstream servers given as DNS names (A/AAAA, re-resolved as their TTL says), as
DNS SRV names (hosts, ports and weights from the records), or listed in a file (re-read when it
changes). Changes apply in each worker without a reload: peers that stay keep their pooled connections,
new ones are added, removed ones take no new requests while their in-flight requests finish.

The resolver is `resolver.address` when configured (dnspython), else the system's (getaddrinfo, which
gives no TTL: names are then re-resolved every `resolver.refresh`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from time import monotonic

log = logging.getLogger("bastion.discovery")


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    weight: int = 1
    backup: bool = False
    drain: bool = False
    region: str | None = None
    zone: str | None = None


@dataclass(frozen=True)
class NameSource:
    name: str
    port: int
    weight: int
    backup: bool
    drain: bool
    region: str | None
    zone: str | None


@dataclass(frozen=True)
class SrvSource:
    name: str
    backup: bool
    drain: bool
    region: str | None
    zone: str | None


@dataclass(frozen=True)
class FileSource:
    path: str


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_servers_file(text: str) -> list[Target]:
    """One server a line: `host:port [weight=N] [backup] [drain] [region=R] [zone=Z]`; '#' starts a comment."""
    from bastion.config.schema import split_host_port

    targets = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        address, *options = line.split()
        host, port = split_host_port(address, "127.0.0.1")
        kw: dict = {}
        for option in options:
            key, _, value = option.partition("=")
            if key == "weight" and value.isdigit() and int(value) >= 1:
                kw["weight"] = int(value)
            elif key in ("backup", "drain") and not value:
                kw[key] = True
            elif key in ("region", "zone") and value:
                kw[key] = value
            else:
                raise ValueError(f"line {number}: unknown option {option!r}")
        targets.append(Target(host, port, **kw))
    return targets


class Resolver:
    def __init__(self, settings):
        self.settings = settings
        self.dns = None
        if settings.address:
            import dns.asyncresolver

            from bastion.config.schema import split_host_port

            host, port = split_host_port(settings.address, "127.0.0.1")
            self.dns = dns.asyncresolver.Resolver(configure=False)
            self.dns.nameservers = [host]
            self.dns.port = port
            self.dns.lifetime = settings.timeout

    def _ttl(self, ttl: float | None) -> float:
        if ttl is None:
            return self.settings.refresh
        return min(max(ttl, self.settings.min_ttl), self.settings.max_ttl)

    async def addresses(self, name: str) -> tuple[list[str], float]:
        """IPv4 and IPv6 addresses of `name`, and how long they may be kept."""
        if self.dns is None:
            infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
            return sorted({info[4][0] for info in infos}), self._ttl(None)
        import dns.exception
        import dns.resolver

        found: list[str] = []
        ttls = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.dns.resolve(name, rdtype)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
                continue
            found += [r.address for r in answer]
            ttls.append(answer.rrset.ttl)
        if not found:
            raise LookupError(f"{name} has no A or AAAA records")
        return sorted(found), self._ttl(min(ttls))

    async def srv(self, name: str) -> tuple[list[tuple[str, int, int, int]], float]:
        """(address, port, weight, priority) for each SRV record of `name`."""
        if self.dns is None:
            raise LookupError("SRV lookups need `resolver.address` in the configuration")
        answer = await self.dns.resolve(name, "SRV")
        out = []
        ttl = answer.rrset.ttl
        for record in answer:
            target = record.target.to_text().rstrip(".")
            addresses, target_ttl = await self.addresses(target)
            ttl = min(ttl, target_ttl)
            out += [(address, record.port, max(1, record.weight), record.priority) for address in addresses]
        return sorted(out), self._ttl(ttl)


class Discovery:
    """Runs in each worker: keeps every group with dynamic sources up to date."""

    def __init__(self, runtime):
        self.groups = [g for g in runtime.upstream_groups if g.sources]
        self.resolver = Resolver(runtime.config.resolver) if self.groups else None
        self.cache: dict = {}  # source -> (targets, expires)
        self.mtimes: dict[str, float] = {}
        self.failing: set = set()
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        if not self.groups:
            return
        try:
            await asyncio.wait_for(self.refresh(), self.resolver.settings.timeout * 3)
        except asyncio.TimeoutError:
            log.warning("service discovery: first lookups are slow; serving with what is known")
        self.task = asyncio.ensure_future(self._loop())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _loop(self) -> None:
        while True:
            now = monotonic()
            due = min((expires for _, expires in self.cache.values()), default=now + 1.0)
            await asyncio.sleep(min(max(due - now, 0.2), 1.0))
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - discovery must never stop; the next round tries again
                log.exception("service discovery failed")

    async def refresh(self) -> None:
        now = monotonic()
        for group in self.groups:
            changed = False
            for source in group.sources:
                entry = self.cache.get(source)
                if entry is not None and entry[1] > now and not isinstance(source, FileSource):
                    continue
                targets, ttl = await self._lookup(source, entry)
                if entry is None or targets != entry[0]:
                    changed = True
                self.cache[source] = (targets, now + ttl)
            if changed:
                wanted = [t for source in group.sources for t in self.cache[source][0]]
                group.replace_dynamic(wanted)
                log.info("upstream %s: servers now %s", group.name,
                         ", ".join(f"{t.host}:{t.port}" for t in wanted) or "none")

    async def _lookup(self, source, entry) -> tuple[tuple, float]:
        old = entry[0] if entry is not None else ()
        try:
            if isinstance(source, FileSource):
                return self._read_file(source, old), 1.0
            if isinstance(source, NameSource):
                addresses, ttl = await self.resolver.addresses(source.name)
                targets = tuple(Target(a, source.port, source.weight, source.backup, source.drain, source.region,
                                       source.zone) for a in addresses)
            else:
                records, ttl = await self.resolver.srv(source.name)
                best = min((priority for *_, priority in records), default=0)
                targets = tuple(Target(a, port, weight, source.backup or priority > best, source.drain, source.region,
                                       source.zone) for a, port, weight, priority in records)
            if source in self.failing:
                self.failing.discard(source)
                log.warning("service discovery: %s resolves again", describe(source))
            return targets, ttl
        except Exception as exc:  # noqa: BLE001 - a failed lookup keeps the last known servers
            if source not in self.failing:
                self.failing.add(source)
                log.warning("service discovery: %s failed (%s); keeping %d known server(s)", describe(source),
                            exc or type(exc).__name__, len(old))
            return old, 2.0

    def _read_file(self, source: FileSource, old: tuple) -> tuple:
        mtime = os.stat(source.path).st_mtime
        if self.mtimes.get(source.path) == mtime:
            return old
        with open(source.path) as f:
            targets = tuple(parse_servers_file(f.read()))
        self.mtimes[source.path] = mtime
        return targets


def describe(source) -> str:
    if isinstance(source, FileSource):
        return f"servers from {source.path}"
    if isinstance(source, SrvSource):
        return f"DNS SRV {source.name}"
    return f"DNS {source.name}:{source.port}"
