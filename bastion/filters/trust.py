"""Is this peer one of the configured trusted proxies? Cached per address: parsing is the slow part."""

from __future__ import annotations

import ipaddress

_MAX_CACHED = 8192


class TrustedProxies:
    def __init__(self, networks: list):
        self.networks = [ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in networks]
        self._cache: dict[str, bool] = {}

    def contains(self, ip: str) -> bool:
        if not self.networks:
            return False
        found = self._cache.get(ip)
        if found is None:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                found = False
            else:
                if address.version == 6 and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                found = any(address.version == n.version and address in n for n in self.networks)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[ip] = found
        return found
