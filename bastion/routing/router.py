"""The router: routes sorted by priority (higher first) then file order; the first that matches wins.

Routes are bucketed by host once per distinct Host value, so a request is only checked against the
routes that can serve its host.
"""

from __future__ import annotations

_MAX_CACHED_HOSTS = 4096


class Router:
    __slots__ = ("routes", "_by_host", "only")

    def __init__(self, routes: list):
        self.routes = sorted(routes, key=lambda r: (-r.priority, r.index))
        self._by_host: dict[bytes, tuple] = {}
        # A single route that takes everything (a plain reverse proxy) needs no lookup at all.
        first = self.routes[0] if self.routes else None
        self.only = first if len(self.routes) == 1 and first.host_accepts is None and not first.conditions else None

    def candidates(self, host: bytes) -> tuple:
        found = self._by_host.get(host)
        if found is None:
            found = tuple(r for r in self.routes if r.host_accepts is None or r.host_accepts(host))
            if len(self._by_host) >= _MAX_CACHED_HOSTS:
                self._by_host.clear()
            self._by_host[host] = found
        return found

    def match(self, exchange):
        if self.only is not None:
            return self.only
        for route in self.candidates(exchange.host):
            for condition in route.conditions:
                if not condition(exchange):
                    break
            else:
                return route
        return None
