"""Region- and zone-aware choice (Envoy's locality and priority model, simplified).

Peers carry `region` and `zone`. A client's locality comes from a trusted header, a CIDR map, a
MaxMind database, or the configured default. Its peers are ordered in levels: same zone, same region,
then other regions in the configured failover order, then everything else. A level keeps
min(1, healthy share / spill_threshold) of the traffic that reaches it and passes the rest on, so a
zone that loses servers sheds load gradually instead of all at once.
"""

from __future__ import annotations

import ipaddress
import logging
import random

log = logging.getLogger("bastion.locality")


def split_locality(text: str | None) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    region, _, zone = text.strip().partition("/")
    return (region or None), (zone or None)


class ClientLocator:
    """Finds a client's (region, zone)."""

    def __init__(self, settings, trusted):
        self.header = settings.header.lower().encode() if settings.header else None
        self.trusted = trusted
        self.networks = sorted(
            ((ipaddress.ip_network(cidr, strict=False), split_locality(where)) for cidr, where in settings.cidrs.items()),
            key=lambda item: -item[0].prefixlen,
        )
        self.default = split_locality(settings.default)
        self.reader = None
        self.maxmind_regions = settings.maxmind_regions
        if settings.maxmind_db:
            import maxminddb

            self.reader = maxminddb.open_database(settings.maxmind_db)
        self._cache: dict[str, tuple] = {}

    def locate(self, ex) -> tuple[str | None, str | None]:
        if self.header is not None and self.trusted.contains(ex.client_ip):
            for name, value in ex.headers:
                if name.lower() == self.header:
                    return split_locality(value.decode("latin-1"))
        found = self._cache.get(ex.client_ip)
        if found is None:
            found = self._by_address(ex.client_ip)
            if len(self._cache) > 8192:
                self._cache.clear()
            self._cache[ex.client_ip] = found
        return found

    def _by_address(self, ip: str) -> tuple:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return self.default
        for network, where in self.networks:
            if address.version == network.version and address in network:
                return where
        if self.reader is not None:
            record = self.reader.get(ip) or {}
            for key in ("country", "registered_country", "continent"):
                code = (record.get(key) or {}).get("iso_code") or (record.get(key) or {}).get("code")
                if code and code in self.maxmind_regions:
                    return self.maxmind_regions[code], None
        return self.default


class LocalityChooser:
    """Per upstream group: orders its peers in levels for a client locality and picks a level."""

    def __init__(self, group, settings, rng: random.Random | None = None):
        self.group = group
        self.threshold = settings.spill_threshold
        self.failover = settings.failover
        self.rng = rng or random.Random()
        self._levels: dict[tuple, list[list]] = {}

    def invalidate(self) -> None:
        self._levels.clear()

    def levels(self, region, zone) -> list[list]:
        key = (region, zone)
        levels = self._levels.get(key)
        if levels is None:
            peers = [p for p in self.group.peers if not p.backup]
            same_zone = [p for p in peers if zone is not None and p.region == region and p.zone == zone]
            same_region = [p for p in peers if p.region == region and p not in same_zone]
            levels = [lvl for lvl in (same_zone, same_region) if lvl]
            placed = set(map(id, same_zone + same_region))
            order = list(self.failover.get(region or "", []))
            order += [p.region for p in peers if p.region not in order and p.region != region]
            for other in order:
                level = [p for p in peers if p.region == other and id(p) not in placed]
                if level:
                    levels.append(level)
                    placed.update(map(id, level))
            rest = [p for p in peers if id(p) not in placed]
            if rest:
                levels.append(rest)
            self._levels[key] = levels
        return levels

    def candidates(self, ex, locator, now: float, tried=None) -> list:
        region, zone = locator.locate(ex) if locator is not None else (None, None)
        shares = []
        usable_levels = []
        remaining = 1.0
        for level in self.levels(region, zone):
            usable = [p for p in level if p.up_since and (not tried or p not in tried)]
            healthy = len([p for p in level if p.up_since]) / len(level)
            share = min(remaining, healthy / self.threshold)
            if usable and share > 0:
                shares.append(share)
                usable_levels.append(usable)
                remaining -= share
            if remaining <= 1e-9:
                break
        if not usable_levels:
            return []
        draw = self.rng.random() * sum(shares)
        for share, usable in zip(shares, usable_levels):
            draw -= share
            if draw < 0:
                return usable
        return usable_levels[-1]
