"""Request predicates a route is compiled into. Each takes an Exchange and returns a bool; they are built
once per config, so nothing here compiles or allocates per request."""

from __future__ import annotations

import re
from typing import Callable

Predicate = Callable[[object], bool]


def host_accepts(patterns: list[str]) -> Callable[[bytes], bool] | None:
    """Exact names and leading '*.' wildcards ('*.example.com' matches any depth of subdomain, not the
    apex). None means any host."""
    if not patterns:
        return None
    exact = frozenset(p.encode() for p in patterns if not p.startswith("*."))
    suffixes = tuple(p[1:].encode() for p in patterns if p.startswith("*."))

    def accepts(host: bytes) -> bool:
        return host in exact or (bool(suffixes) and host.endswith(suffixes))

    return accepts


def path_prefix(prefix: str) -> Predicate:
    value = prefix.encode()
    return lambda ex: ex.path.startswith(value)


def path_exact(path: str) -> Predicate:
    value = path.encode()
    return lambda ex: ex.path == value


def path_regex(pattern: str) -> Predicate:
    search = re.compile(pattern.encode()).search
    return lambda ex: search(ex.path) is not None


def method_in(methods: list[str]) -> Predicate:
    allowed = frozenset(m.encode() for m in methods)
    return lambda ex: ex.method in allowed


def header_matches(name: str, exact: str | None, regex: str | None, present: bool | None) -> Predicate:
    key = name.lower().encode()

    def values(ex):
        return [v for n, v in ex.headers if n.lower() == key]

    if present is not None:
        return (lambda ex: bool(values(ex))) if present else (lambda ex: not values(ex))
    if exact is not None:
        wanted = exact.encode("latin-1")
        return lambda ex: wanted in values(ex)
    search = re.compile(regex.encode("latin-1")).search
    return lambda ex: any(search(v) for v in values(ex))
