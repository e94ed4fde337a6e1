"""Build the security filters of a configuration (called by config/compile.py, in the master, before the
workers are forked: the shared-memory tables must exist before the fork)."""

from __future__ import annotations

from bastion.security.access import AccessFilter, IpList
from bastion.security.bans import AutoBan, BanList
from bastion.security.clientip import ClientAddress
from bastion.security.connections import ClientGuard, ConnectionGuard, RouteConcurrency, RouteSizeLimits
from bastion.security.headers import HideBackendLocation, SecurityHeaders
from bastion.security.ratelimit import RateLimitFilter
from bastion.security.redis_store import RedisLink
from bastion.security.shared import shared_table
from bastion.security.stats import node_stats


class SecuritySetup:
    def __init__(self, config, trusted):
        spec = config.security
        self.spec = spec
        self.stats = node_stats()
        self.client_address = ClientAddress(trusted, spec.client_ip_header)
        self.redis = RedisLink(spec.redis, self.stats) if spec.redis is not None else None
        self.access = IpList(spec.access.allow, spec.access.deny)
        self.auto_ban = None
        self.bans = None
        if spec.auto_ban is not None or self.redis is not None:
            self.bans = BanList(spec.table_slots, self.stats, self.redis)
        if spec.auto_ban is not None:
            self.auto_ban = AutoBan(spec.auto_ban, self.bans, self.client_address, spec.table_slots)
        self._limits_table = None
        self.global_limits = [self._limit(r, r.name or f"global-{i}") for i, r in enumerate(spec.rate_limits)]
        self.headers = SecurityHeaders(spec.headers) if spec.headers is not None else None
        self.connection_guard = None
        if spec.connections.max_per_ip or spec.connections.max_total or self.access or self.bans is not None:
            self.connection_guard = ConnectionGuard(spec.connections, self.access, self.bans, trusted, self.stats)
        self.periodic = [self.stats.flush]
        if self.bans is not None and self.redis is not None:
            self.periodic.append(self.bans.sync)

    def _limit(self, spec, name: str) -> RateLimitFilter:
        if self._limits_table is None:
            self._limits_table = shared_table("rate-limits", self.spec.table_slots, "Qd")
        return RateLimitFilter(spec, name, self._limits_table, self.client_address, self.stats, self.redis)

    def head(self) -> list:
        """Filters every route (and the no-route fallback) starts with."""
        if self.access or self.bans is not None:
            status = self.spec.auto_ban.status if self.spec.auto_ban is not None else 403
            return [ClientGuard(self.access, self.bans, self.client_address, self.stats, status)]
        return []

    def route_front(self, route_spec, route_name: str, config) -> list:
        """The route's own security filters, ahead of its other filters."""
        sec = route_spec.security
        out = []
        if sec.access is not None:
            ip_list = IpList(sec.access.allow, sec.access.deny)
            if ip_list:
                out.append(AccessFilter(ip_list, self.client_address, self.stats))
        lim = route_spec.limits
        if lim.request_line is not None or lim.header_bytes is not None or lim.header_count is not None:
            out.append(RouteSizeLimits(lim.request_line, lim.header_bytes, lim.header_count))
        if not sec.skip_global_rate_limits:
            out += self.global_limits
        out += [self._limit(r, r.name or f"{route_name}-{i}") for i, r in enumerate(sec.rate_limits)]
        if sec.max_concurrent is not None:
            out.append(RouteConcurrency(route_name, sec.max_concurrent, self.stats))
        return out

    def route_back(self, route_spec, group) -> list:
        """Response-phase filters: security headers, backend addresses hidden."""
        out = []
        headers = route_spec.security.headers
        if headers is not None:
            out.append(SecurityHeaders(headers))
        elif self.headers is not None:
            out.append(self.headers)
        hide = self.spec.hide_backends
        if group is not None and hide.rewrite_location:
            out.append(HideBackendLocation(group, hide.public_host, hide.public_scheme))
        return out

    def fallback_front(self) -> list:
        """Request filters for requests that match no route: the global rate limits."""
        return list(self.global_limits)

    def fallback_back(self) -> list:
        return [self.headers] if self.headers is not None else []

    def tail(self) -> list:
        return [self.auto_ban] if self.auto_ban is not None else []
