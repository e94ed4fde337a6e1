"""Set, add and remove request headers (towards the backend) and response headers (towards the client)."""

from __future__ import annotations


def _compile(ops) -> tuple | None:
    if ops is None:
        return None
    remove = {n.lower().encode() for n in ops.remove} | {n.lower().encode() for n in ops.set}
    add = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.set.items()]
    add += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in ops.add.items()]
    if not remove and not add:
        return None
    return frozenset(remove), add


def _apply(headers: list, ops: tuple) -> list:
    remove, add = ops
    if remove:
        headers = [(n, v) for n, v in headers if n.lower() not in remove]
    if add:
        headers.extend(add)
    return headers


class RequestHeaders:
    def __init__(self, ops):
        self.ops = _compile(ops)

    def upstream_request_filter(self, ex) -> None:
        ex.headers = _apply(ex.headers, self.ops)


class ResponseHeaders:
    def __init__(self, ops):
        self.ops = _compile(ops)

    def response_filter(self, ex) -> None:
        ex.response_headers_raw = _apply(ex.response_headers_raw, self.ops)
