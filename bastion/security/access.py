"""IP allow/deny lists (IPv4 and IPv6 CIDRs). Deny wins; a non-empty allow list admits only its members.
Verdicts are cached per address, so a list costs one dictionary lookup per request."""

from __future__ import annotations

import ipaddress

from bastion.proxy.exchange import Response

_MAX_CACHED = 16384


class IpList:
    def __init__(self, allow: list, deny: list):
        self.allow = [ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in allow]
        self.deny = [ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in deny]
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def admits(self, ip: str) -> bool:
        verdict = self._cache.get(ip)
        if verdict is None:
            verdict = self._judge(ip)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[ip] = verdict
        return verdict

    def _judge(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return not self.allow
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for net in self.deny:
            if address.version == net.version and address in net:
                return False
        if not self.allow:
            return True
        return any(address.version == net.version and address in net for net in self.allow)


def forbidden(status: int = 403) -> Response:
    return Response(status, "access denied\n", {"Cache-Control": "no-store"},
                    content_type="text/plain; charset=utf-8")


class AccessFilter:
    """A route's (or the global) list, checked on the real client address as the first request filter."""

    keeps_request = True  # never changes the request: the cache may keep keys per repeated head

    def __init__(self, ip_list: IpList, client_address, stats):
        self.list = ip_list
        self.client_address = client_address
        self.stats = stats

    def request_filter(self, ex):
        if self.list.admits(self.client_address.of(ex)):
            return None
        ex.error = "access_denied"
        ex.conn.close_after = True
        self.stats.count("access_denied")
        return forbidden()
