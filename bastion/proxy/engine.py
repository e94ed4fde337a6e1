"""The phase engine: request -> route -> request filters -> upstream select -> upstream request filters,
then (driven by the backend's answer) response filters -> log.

It owns no sockets. The protocol layer (bastion.http) calls `start` when a request head is complete and
`finish` when the exchange is over; the engine calls back into the connection for I/O. The common case
(all filters synchronous, a pooled backend connection available) runs without creating a task.
"""

from __future__ import annotations

import asyncio
import logging
from inspect import isawaitable
from time import monotonic
from typing import TYPE_CHECKING

from bastion.proxy.errors import error_response
from bastion.proxy.exchange import Exchange, Response
from bastion.proxy.runtime import CompiledRoute, Runtime

if TYPE_CHECKING:
    from bastion.http.h1_server import ClientConnection

log = logging.getLogger("bastion.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def start(conn: ClientConnection, ex: Exchange, runtime: Runtime) -> None:
    router = runtime.router
    found = router.only  # one route that takes everything: no lookup
    if found is None:
        found = router.match(ex)
    if found is None:
        # No route: the global request filters (bans, access lists, rate limits, ACME answers) still
        # run, then the fallback route, which has no upstream, answers 404 (see proceed_to_upstream).
        found = runtime.fallback_route
        if not found.on_request:
            ex.route = found
            ex.error = "no_route"
            respond_error(conn, ex, 404)
            return
    route: CompiledRoute = found
    ex.route = route
    if ex.content_length is not None and ex.content_length > route.body_limit:
        ex.error = "body_too_large"
        conn.close_after = True
        respond_error(conn, ex, 413)
        return
    if route.on_request:
        run_request_filters(conn, ex, route, 0)
    else:
        proceed_to_upstream(conn, ex, route)


def run_request_filters(conn, ex, route, index: int) -> None:
    filters = route.on_request
    count = len(filters)
    while index < count:
        try:
            result = filters[index](ex)
        except Exception:
            log.exception("request_filter %r failed", filters[index])
            ex.error = "filter_error"
            respond_error(conn, ex, 500)
            return
        index += 1
        if result is None:
            continue
        if type(result) is Response or isinstance(result, Response):
            if result.wire is not None:  # respond(), without a call for a prepared answer (a cache hit)
                ex.status = result.status
                ex.response_headers_raw = result.headers._items
                conn.write_local_wire(ex, result)
            else:
                respond(conn, ex, result)
            return
        if isawaitable(result):
            conn.hold_reading()
            conn.loop.create_task(_await_request_filter(conn, ex, route, result, index))
            return
        log.error("request_filter %r returned %r; expected None or a Response", filters[index - 1], result)
        ex.error = "filter_error"
        respond_error(conn, ex, 500)
        return
    proceed_to_upstream(conn, ex, route)


async def _await_request_filter(conn, ex, route, awaitable, index: int) -> None:
    try:
        result = await awaitable
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request_filter failed")
        result = None
        ex.error = "filter_error"
    if conn.active is not ex or conn.closed:
        return
    conn.release_reading()
    if ex.error == "filter_error":
        respond_error(conn, ex, 500)
    elif isinstance(result, Response):
        respond(conn, ex, result)
    elif result is not None:
        log.error("request_filter returned %r; expected None or a Response", result)
        ex.error = "filter_error"
        respond_error(conn, ex, 500)
    else:
        run_request_filters(conn, ex, route, index)


def proceed_to_upstream(conn: ClientConnection, ex: Exchange, route: CompiledRoute) -> None:
    group = route.upstream
    if group is None:
        if route.index < 0:  # the no-route fallback, after its request filters let the request through
            ex.error = "no_route"
            respond_error(conn, ex, 404)
            return
        # A route whose terminal filter did not answer (cannot happen with a valid config).
        ex.error = "no_action"
        respond_error(conn, ex, 500)
        return
    if group.max_requests is not None and group.active >= group.max_requests:
        # Circuit breaking: beyond the configured concurrency the answer is an immediate 503.
        ex.error = "circuit_open"
        respond_error(conn, ex, 503, retry_after=1)
        return
    peer = group.select(ex)
    if peer is None:
        ex.error = "no_server"
        respond_error(conn, ex, 503, retry_after=retry_after(group))
        return
    budget = group.budget
    if budget is not None:
        budget.requests += 1
    ex.peer = peer
    peer.active += 1
    group.active += 1
    ex.attempting = True
    for f in route.on_upstream_request:
        try:
            f(ex)
        except Exception:
            log.exception("upstream_request_filter %r failed", f)
            ex.error = "filter_error"
            respond_error(conn, ex, 500)
            return
    conn.forward(ex, peer)


def respond(conn, ex, response: Response, replaceable: bool = False) -> None:
    """Answer with a response Bastion made (a filter's, a redirect, an error page). `replaceable`: a
    response filter may answer in its place (Bastion's error for a failed backend: a cache's stale copy)."""
    ex.status = response.status
    if response.wire is not None:
        ex.response_headers_raw = response.headers._items
        conn.write_local_wire(ex, response)
        return
    ex.response_headers_raw = list(response.headers.raw)
    replacement = run_response_filters(ex, replaceable)
    conn.write_local_response(ex, response.body if replacement is None else replacement.body)


def respond_error(conn, ex, status: int, retry_after: int | None = None) -> None:
    accept = None
    for name, value in ex.headers:
        if len(name) == 6 and name.lower() == b"accept":
            accept = value
            break
    response = error_response(status, ex.request_id, accept)
    if retry_after is not None:
        response.headers.add("Retry-After", str(retry_after))
    route = ex.route
    respond(conn, ex, response, status >= 502 and route is not None and route.upstream is not None)


# -- upstream attempts and retries ---------------------------------------------------------------------------
# An attempt is one try of an exchange on one peer; in-flight counts (least_conn, circuit breaking) follow it.

RETRY_KINDS = {
    "connect_refused": "connect_failure",
    "connect_error": "connect_failure",
    "connect_timeout": "connect_failure",
    "tls_error": "connect_failure",
    "upstream_reset": "reset",
    "upstream_timeout": "timeout",
}


def begin_attempt(ex, peer, group) -> None:
    ex.peer = peer
    peer.active += 1
    group.active += 1
    ex.attempting = True


def end_attempt(ex) -> None:
    if ex.attempting:
        ex.attempting = False
        ex.peer.active -= 1
        ex.route.upstream.active -= 1


def next_peer_for_retry(ex, kind: str, sent: bool):
    """The peer to try next after a failure of `kind`, or None. A request that never reached a backend
    (connect failures) may always be retried; one that may have, only when idempotent (by default)."""
    group = ex.route.upstream
    if kind not in group.retry_on:
        return None
    tried = ex.tried
    if tried is None:
        tried = ex.tried = [ex.peer]
    if len(tried) >= group.attempts:
        return None
    if sent and group.retry_idempotent_only and ex.method not in IDEMPOTENT:
        return None
    if group.retry_deadline is not None and monotonic() - ex.start > group.retry_deadline:
        ex.error_detail = "retry_deadline"
        return None
    if not ex.request_complete or (ex.body_sent and not ex.body_chunks):
        return None  # the body is not all here, or already streamed away: it cannot be sent again
    peer = group.select(ex, tried)
    if peer is None:
        return None
    if group.budget is not None and not group.budget.allow_retry():
        ex.error_detail = "retry_budget"
        return None
    tried.append(peer)
    ex.retries += 1
    return peer


def retry_after(group) -> int:
    """Seconds until a peer may be back: the soonest ejection end, else the health check interval."""
    now = monotonic()
    ends = [p.ejected_until - now for p in group.peers if p.ejected_until > now]
    if ends:
        return max(1, int(min(ends) + 0.999))
    if group.active_check is not None:
        return max(1, int(group.active_check.interval))
    return 1


def run_response_filters(ex: Exchange, replaceable: bool = True) -> Response | None:
    """The response phase. For a backend's response (`replaceable`), a filter may answer with a Response in
    its place: it is returned and kept in `ex.replacement`, and later filters see it. Bastion's own answers
    are not replaced."""
    route = ex.route
    if route is None:
        return None
    replacement = None
    wants = route.response_statuses()
    for i, f in enumerate(route.on_response):
        statuses = wants[i]
        if statuses is not None and ex.status not in statuses:
            continue
        try:
            result = f(ex)
        except Exception:
            log.exception("response_filter %r failed", f)
            continue
        if replaceable and result is not None and isinstance(result, Response):
            replacement = ex.replacement = result
            ex.status = result.status
            ex.response_headers_raw = list(result.headers.raw)
    return replacement


def run_body_filters(ex, data: bytes, end: bool) -> bytes:
    """The response body phase for a backend's body: each filter gets what the one before it let through.
    A failing filter is logged and passes its input on unchanged."""
    for f in ex.route.on_response_body:
        try:
            data = f(ex, data, end)
        except Exception:
            log.exception("response_body_filter %r failed", f)
        if data is None:
            data = b""
    return data


def finish(ex) -> None:
    """The log phase: runs once per exchange, whatever happened."""
    route = ex.route
    if route is None:
        return
    for f in route.on_log:
        try:
            f(ex)
        except Exception:
            log.exception("logging filter %r failed", f)


def retryable(ex) -> bool:
    return ex.method in IDEMPOTENT
