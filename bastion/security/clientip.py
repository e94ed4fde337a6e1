"""The real client address: the connection's peer (or what the PROXY protocol header said), unless that
peer is a trusted proxy; then the right-most address in X-Forwarded-For (or the configured header) that is
not itself a trusted proxy. Computed only for requests that came through a proxy."""

from __future__ import annotations


class ClientAddress:
    __slots__ = ("trusted", "header")

    def __init__(self, trusted, header: str = "X-Forwarded-For"):
        self.trusted = trusted
        self.header = header.lower().encode()

    def of(self, ex) -> str:
        ip = ex.client_ip
        if not ex.via_proxy or not self.trusted.networks:
            return ip
        state = ex.state
        found = state.get("real_client_ip")
        if found is not None:
            return found
        found = ip
        if self.trusted.contains(ip):
            wanted = self.header
            hops: list[bytes] = []
            for name, value in ex.headers:
                if name.lower() == wanted:
                    hops.extend(value.split(b","))
            for hop in reversed(hops):
                address = hop.strip().decode("latin-1")
                if address.startswith("[") and "]" in address:
                    address = address[1 : address.index("]")]
                if not address:
                    continue
                found = address
                if not self.trusted.contains(address):
                    break
        state["real_client_ip"] = found
        return found
