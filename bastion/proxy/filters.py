"""Filters: the only way features hook into a request.

A filter is any object with one or more phase methods; subclassing `Filter` is optional and only gives
no-op defaults. Phases, in the order a request walks them:

- ``request_filter(exchange)``: after routing. Return None to continue, or a `Response` to answer now.
  May be ``async def`` (or return an awaitable) when it needs I/O.
- ``upstream_request_filter(exchange)``: after a peer is chosen; edit what goes to the backend.
- ``response_filter(exchange)``: the response head (status and headers) before it goes to the client. For a
  backend's response it may return a `Response` that replaces it (the backend's body is read and dropped,
  its connection kept): a cache answering a 304 revalidation with the stored object does this.
- ``response_body_filter(exchange, data, end)``: each chunk of a backend's response body, then once with
  ``end=True`` (and usually ``b""``). Returns the bytes to send on (``b""`` to hold them back). A filter that
  changes the body's length removes ``Content-Length`` in its ``response_filter``; the response is then
  sent chunked (or closed-delimited to HTTP/1.0 clients).
- ``logging(exchange)``: after the exchange is over, success or not.

Only the methods a filter really defines are put in a route's compiled phase tuples, so a filter costs
nothing in the phases it does not use.
"""

from __future__ import annotations

import importlib
from typing import Any

PHASES = ("request_filter", "upstream_request_filter", "response_filter", "response_body_filter", "logging")


class Filter:
    """Optional base class; override the phases you need."""

    def request_filter(self, exchange) -> Any:
        return None

    def upstream_request_filter(self, exchange) -> None:
        return None

    def response_filter(self, exchange) -> Any:
        return None

    def response_body_filter(self, exchange, data: bytes, end: bool) -> bytes:
        return data

    def logging(self, exchange) -> None:
        return None


def phase_methods(filters: list, phase: str) -> tuple:
    """Bound methods of `filters` that implement `phase` (base-class no-ops left out)."""
    methods = []
    base = getattr(Filter, phase)
    for f in filters:
        method = getattr(f, phase, None)
        if method is None:
            continue
        if getattr(type(f), phase, None) is base:
            continue
        methods.append(method)
    return tuple(methods)


class FilterLoadError(Exception):
    pass


def load_filter(import_path: str, options: dict) -> object:
    module_name, _, class_name = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a config problem to report
        raise FilterLoadError(f"cannot import module {module_name!r}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise FilterLoadError(f"module {module_name!r} has no {class_name!r}")
    try:
        instance = cls(**options)
    except Exception as exc:  # noqa: BLE001
        raise FilterLoadError(f"{import_path} could not be created with {options!r}: {exc}") from None
    if not any(callable(getattr(instance, phase, None)) for phase in PHASES):
        raise FilterLoadError(f"{import_path} has none of the phase methods {', '.join(PHASES)}")
    return instance
