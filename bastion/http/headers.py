"""Header tables and a small header-list wrapper for filters.

The hot path keeps headers as a list of (name, value) byte tuples in received order, names in their
original case. Filters see them through `Headers`, which speaks str and does case-insensitive lookups.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Iterator

# RFC 9110 7.6.1 hop-by-hop headers, plus the Proxy-* family handled by prefix.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


def _reason(code: int) -> bytes:
    try:
        return HTTPStatus(code).phrase.encode()
    except ValueError:
        return b"Unknown"


STATUS_LINES: dict[int, bytes] = {code: b"HTTP/1.1 %d %s\r\n" % (code, _reason(code)) for code in range(100, 600)}


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % code
    return line


def reason_phrase(code: int) -> str:
    return _reason(code).decode()


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


def _s(value: bytes) -> str:
    return value.decode("latin-1")


class Headers:
    """A view over a list of (name, value) byte tuples; edits change the underlying list."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[bytes, bytes]] | None = None):
        self._items = items if items is not None else []

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        return self._items

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        key = _b(name).lower()
        for n, v in self._items:
            if n.lower() == key:
                return _s(v)
        return default

    def get_all(self, name: str | bytes) -> list[str]:
        key = _b(name).lower()
        return [_s(v) for n, v in self._items if n.lower() == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        key = _b(name).lower()
        return any(n.lower() == key for n, _ in self._items)

    def set(self, name: str | bytes, value: str | bytes) -> None:
        self.remove(name)
        self._items.append((_b(name), _b(value)))

    def add(self, name: str | bytes, value: str | bytes) -> None:
        self._items.append((_b(name), _b(value)))

    def remove(self, name: str | bytes) -> None:
        key = _b(name).lower()
        self._items[:] = [(n, v) for n, v in self._items if n.lower() != key]

    def items(self) -> Iterator[tuple[str, str]]:
        for n, v in self._items:
            yield _s(n), _s(v)

    def __iter__(self) -> Iterator[str]:
        for n, _ in self._items:
            yield _s(n)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self.items())!r})"
