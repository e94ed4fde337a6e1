"""The HTTP cache as a filter (one instance per route with `cache:`), over a shared store.

request_filter   look the request up: answer a fresh hit right here (a dict lookup and a prebuilt
                 response), serve stale within stale-while-revalidate (refreshing in the background),
                 turn a stale entry into a conditional request, make concurrent misses of one key wait
                 for the first (collapsing: in this worker with a future; across the node's workers
                 with the disk store's lock file, across nodes with a Redis lock), handle PURGE.
response_filter  (runs first among the route's response filters, on the backend's own head) a 304 to
                 our revalidation answers with the stored response, refreshed; a 5xx or a failed
                 backend answers with a stale one within stale-if-error / grace; a storable response
                 starts being recorded; a successful unsafe request invalidates.
response_body_filter  records the body (up to max_object_size) and stores it at the end.
logging          releases collapsed waiters (and the key's lock) if the exchange ended without storing.

RFC 9111 decisions come from bastion.cache.policy (pure functions).
"""

from __future__ import annotations

import asyncio
import logging
import os
from time import monotonic, time
from urllib.parse import parse_qsl, urlencode

from bastion.cache import policy
from bastion.cache.memory import Entry
from bastion.config.schema import parse_status_set
from bastion.http.headers import Headers, status_line
from bastion.proxy.exchange import FileBody, Response

log = logging.getLogger("bastion.cache")

STATE = "cache"
_SCHEME_PREFIX = {"http": b"http://", "https": b"https://"}
MEMORY_OBJECT_MAX = 1 << 20  # with the disk store, larger responses stream to their file only

# Request fields that change what the cache may do; a request with none of them takes the fast path.
_REQUEST_FIELDS = frozenset({
    b"cache-control", b"pragma", b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since",
    b"if-range", b"range", b"authorization",
})
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since", b"if-range", b"range"})
# Every other method (POST, PUT, DELETE, PATCH, and the unknown ones) is unsafe: a success invalidates.
_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PURGE"})
# Failures meaning "no backend could be reached": the grace period applies to them.
_DOWN = frozenset({"connect_refused", "connect_error", "connect_timeout", "no_server", "circuit_open", "tls_error"})
_BACKEND_ERRORS = _DOWN | {"upstream_reset", "upstream_timeout", "invalid_response", "upstream_reset_midway"}

MISS = 1
REVALIDATE = 2
UNSAFE = 3
BYPASS = 4
SERVED = 5


class _State:
    __slots__ = ("mode", "key", "entry", "request_time", "headers", "client", "chunks", "size", "pending",
                 "meta", "detail", "collapsed", "writer", "lock", "put_task", "finished")

    def __init__(self, mode: int, key: bytes = b""):
        self.mode = mode
        self.key = key
        self.entry: Entry | None = None
        self.request_time = 0.0
        self.headers: list | None = None  # the client's request headers as received
        self.client: dict | None = None  # the client's cache-relevant fields
        self.chunks: list | None = None
        self.size = 0
        self.pending = None  # the collapsing future this exchange must resolve
        self.meta = None
        self.detail = b""
        self.collapsed = False
        self.writer = None  # the disk store's writer, when the body streams to a file
        self.lock = None  # the key's lock beyond this worker: True (disk store) or our token (Redis)
        self.put_task = None  # the Redis store of the fetched response, which the lock's release waits for
        self.finished = False  # the log phase ran: nothing of this exchange may hold a lock any more


class Counts:
    """Per-worker event counts, added to Prometheus on the runtime tick."""

    EVENTS = ("hit", "miss", "stale", "revalidated", "revalidation", "collapsed", "stored", "eviction",
              "purged", "invalidated", "bypass")

    def __init__(self):
        self.values = dict.fromkeys(self.EVENTS, 0)


class HttpCache:
    """The route's cache filter. `shared` is the node-wide CacheRuntime (store, purge journal, counts)."""

    def __init__(self, route_name: str, spec, shared):
        self.route_name = route_name
        self.shared = shared
        self.store = shared.store
        self.slots = shared.store.slots  # the same dict for the store's life (purge_all clears it in place)
        self.journal = shared.journal
        self.remote = shared.redis if spec.store == "redis" else None  # the shared second level
        self.disk = shared.disk if spec.store == "disk" else None  # the node's second level
        self.counts = shared.counts_for(route_name)
        self.name = shared.name.encode()
        self.spec = spec
        key = spec.key
        self.key_scheme = key.scheme
        self.key_host = key.host
        self.key_query = key.query
        self.query_ignore = frozenset(key.query_ignore)
        self.query_keep = frozenset(key.query_keep) if key.query_keep is not None else None
        self.sort_query = key.sort_query
        self.key_headers = tuple(h.lower().encode() for h in key.headers)
        self.key_cookies = tuple(key.cookies)
        self.plain_key = (key.scheme and key.host and key.query == "all" and not self.query_ignore
                          and self.query_keep is None and not self.sort_query and not self.key_headers
                          and not self.key_cookies)
        self.methods = frozenset(m.encode() for m in spec.methods)
        self.statuses = parse_status_set(spec.statuses) if spec.statuses else policy.DEFAULT_STATUSES
        self.max_object = spec.max_object_size
        self.default_ttl = spec.default_ttl
        self.max_ttl = spec.max_ttl
        self.heuristic_fraction = spec.heuristic_fraction
        self.heuristic_max = spec.heuristic_max
        self.store_set_cookie = spec.store_set_cookie
        self.swr = spec.stale_while_revalidate
        self.sie = spec.stale_if_error
        self.grace = spec.grace
        self.collapse = spec.collapse
        self.collapse_timeout = spec.collapse_timeout
        self.purge_from = tuple(spec.purge_from)
        self.inflight: dict[bytes, asyncio.Future] = {}
        # Collapsing beyond this worker: the store is shared by the node's workers (disk) or by nodes (Redis).
        self.collapse_shared = spec.collapse and (self.disk is not None or self.remote is not None)
        self.fast: bool | None = None  # no other response filter on the route: hits skip the phase
        self.memo_ok: bool | None = None  # keys may be kept in remembered request heads (_memo_ok)
        self.route = None

    # -- keys -------------------------------------------------------------------------------------------------
    def key_of(self, ex) -> bytes:
        target = ex.path + b"?" + ex.query if ex.query else ex.path
        if self.plain_key:
            return ex.scheme.encode() + b"://" + ex.host_header.lower() + target
        parts = []
        if self.key_scheme:
            parts.append(ex.scheme.encode() + b"://")
        if self.key_host:
            parts.append(ex.host_header.lower())
        parts.append(ex.path)
        if ex.query and self.key_query != "none":
            pairs = parse_qsl(ex.query.decode("latin-1"), keep_blank_values=True)
            if self.query_keep is not None:
                pairs = [p for p in pairs if p[0] in self.query_keep]
            if self.query_ignore:
                pairs = [p for p in pairs if p[0] not in self.query_ignore]
            if self.sort_query or self.key_query == "sorted":
                pairs.sort()
            if pairs:
                parts.append(b"?" + urlencode(pairs).encode("latin-1"))
        for name in self.key_headers:
            values = [v for n, v in ex.headers if n.lower() == name]
            parts.append(b"\x00h:" + name + b"=" + b",".join(values))
        if self.key_cookies:
            cookies = _cookies(ex.headers)
            for name in self.key_cookies:
                parts.append(b"\x00c:" + name.encode() + b"=" + cookies.get(name, "").encode("latin-1"))
        return b"".join(parts)

    @staticmethod
    def url_of(ex) -> str:
        target = ex.path + b"?" + ex.query if ex.query else ex.path
        return f"{ex.scheme}://{ex.host_header.lower().decode('latin-1')}{target.decode('latin-1')}"

    def _memo_ok(self, route) -> bool:
        """The key derived from a remembered head holds for every repeat when no request filter before this
        one may change the request (it is the first, or those before it say they keep it as it is)."""
        for f in route.on_request:
            if f == self.request_filter:
                return True
            if not getattr(getattr(f, "__self__", None), "keeps_request", False):
                return False
        return False

    def _head_facts(self, ex):
        """(cache key, the request's cache-related fields or None) for a cacheable method; (None, None)
        otherwise."""
        if ex.method not in self.methods:
            return None, None
        if self.plain_key:
            query = ex.query
            key = _SCHEME_PREFIX[ex.scheme] + ex.host_header.lower() + (ex.path + b"?" + query if query else ex.path)
        else:
            key = self.key_of(ex)
        client = None
        for name, value in ex.headers:
            lname = name.lower()
            if lname in _REQUEST_FIELDS:
                if client is None:
                    client = {}
                old = client.get(lname)
                client[lname] = value if old is None else old + b", " + value
        return key, client

    def _other_method(self, ex):
        method = ex.method
        if method == b"PURGE":
            return self._purge_request(ex)
        if method not in _SAFE:
            ex.state[STATE] = _State(UNSAFE)
        return None

    # -- request phase ----------------------------------------------------------------------------------------
    def request_filter(self, ex):
        known = ex.known
        if known is not None and self.memo_ok is not False:
            # a remembered request head: its cache key and cache-related fields were derived before
            head = known.memo.get(self)
            if head is None:
                if self.memo_ok is None:
                    self.memo_ok = self._memo_ok(ex.route)
                    if not self.memo_ok:
                        return self.request_filter(ex)
                head = known.memo[self] = self._head_facts(ex)
            key, client = head
            if key is None:
                return self._other_method(ex)
        else:
            if ex.method not in self.methods:
                return self._other_method(ex)
            key, client = self._head_facts(ex)
        now = time()
        journal = self.journal
        if journal.seq_view[0] != journal.seen:
            self.shared.poll()  # another worker purged something: apply it before answering from the store
        slot = self.slots.get(key)
        if slot is not None:
            if type(slot) is Entry:
                entry = slot
            else:
                entry = slot.variants.get(_variant(slot.names, ex.headers))
            if entry is not None and client is None:
                if now < entry.hit_until and entry.hit_filter is self:
                    # The fast path: a fresh hit for a request with nothing special, answered this second.
                    if entry.freq < 3:
                        entry.freq += 1
                    self.counts["hit"] += 1
                    return entry.hit_response
                if now < entry.fresh_until and not entry.needs_check:
                    if entry.freq < 3:
                        entry.freq += 1
                    self.counts["hit"] += 1
                    return self._hit_response(ex, entry, now)
        else:
            entry = None
        varied = False
        if entry is None:
            varied = slot is not None  # this worker holds other variants of the URL
            if self.disk is not None:
                entry, on_disk = self.disk.lookup(key, lambda names: _variant(names, ex.headers), MEMORY_OBJECT_MAX)
                varied = varied or on_disk
                if entry is not None:
                    if entry.body is not None:
                        self.store.put(entry)  # large bodies stay in their file, read per response
                    if client is None and now < entry.fresh_until and not entry.needs_check:
                        self.counts["hit"] += 1
                        return self._hit_response(ex, entry, now)
            elif self.remote is not None:
                return self._remote_lookup(ex, key, client, now, varied)
        elif now >= entry.fresh_until and not entry.needs_check:
            # Stale in this worker's memory: another worker or node may have stored a newer copy since
            # (without this, each worker would revalidate or refresh its own copy).
            if self.disk is not None:
                newer = self.disk.get(key, lambda names: _variant(names, ex.headers), MEMORY_OBJECT_MAX)
                if newer is not None and newer.response_time > entry.response_time:
                    if newer.body is not None:
                        self.store.put(newer)
                    entry = newer
                    if client is None and now < entry.fresh_until:
                        self.counts["hit"] += 1
                        return self._hit_response(ex, entry, now)
            elif self.remote is not None:
                return self._remote_lookup(ex, key, client, now, False, entry)
        return self._lookup(ex, key, entry, client, now, varied)

    async def _remote_lookup(self, ex, key: bytes, client, now: float, varied: bool, stale: Entry | None = None):
        """Not in this worker's memory (or only `stale` there): ask the shared store, keep what it has here
        too."""
        remote = self.remote
        remote.subscribe(self.shared.apply_remote)
        entry, in_redis = await remote.lookup(key, lambda names: _variant(names, ex.headers))
        if stale is not None and (entry is None or entry.response_time <= stale.response_time):
            entry = stale
        elif entry is not None:
            self.store.put(entry)
            now = time()
        result = self._lookup(ex, key, entry, client, now, varied or in_redis)
        if result is not None and not isinstance(result, Response):
            result = await result
        return result

    def _hit_response(self, ex, entry: Entry, now: float) -> Response:
        second = int(now)
        age = int(now - entry.response_time + entry.initial_age)
        ttl = int(entry.fresh_until - now)
        cache_status = self.name + b"; hit; ttl=%d" % ttl
        if entry.body is None:
            return self._response(entry, entry.status, _body(entry), age, cache_status)
        response = self._response(entry, entry.status, entry.body, age, cache_status)
        if self.fast is None:
            route = ex.route
            # Hits skip the response phase when the other response filters were applied before storing.
            self.fast = all(f == self.response_filter or getattr(getattr(f, "__self__", None), "cache_safe_response", False)
                            for f in route.on_response)
        if self.fast:
            wire = [status_line(entry.status), entry.head_bytes, b"Age: %d\r\nCache-Status: %s\r\n" % (age, cache_status)]
            if entry.status >= 200 and entry.status not in (204, 304):
                wire.append(b"Content-Length: %d\r\n" % len(entry.body))
            response.wire = b"".join(wire)
            if len(entry.body) <= 16384:
                response.whole = response.wire + b"\r\n" + entry.body
        entry.hit_until = min(second + 1.0, entry.fresh_until) if not entry.needs_check else 0.0
        entry.hit_response = response
        entry.hit_filter = self
        return response

    @staticmethod
    def _response(entry: Entry, status: int, body: bytes, age: int, cache_status: bytes, extra=None) -> Response:
        response = Response.__new__(Response)
        response.status = status
        response.body = body
        headers = list(entry.headers)
        headers.append((b"Age", b"%d" % age))
        headers.append((b"Cache-Status", cache_status))
        if extra:
            headers += extra
        response.headers = Headers(headers)
        response.wire = None
        response.whole = None
        return response

    def _lookup(self, ex, key: bytes, entry: Entry | None, client: dict | None, now: float, varied: bool = False):
        """`varied`: nothing stored for this request, but responses for other values of the URL's Vary
        fields are (RFC 9211 fwd=vary-miss rather than uri-miss)."""
        client = client or {}
        request_cc = policy.parse_cache_control([client[b"cache-control"].decode("latin-1")]) \
            if b"cache-control" in client else {}
        pragma = client.get(b"pragma")
        no_cache = policy.request_no_cache(request_cc, pragma.decode("latin-1") if pragma is not None else None)
        if b"if-match" in client or b"if-unmodified-since" in client or "no-store" in request_cc:
            # Preconditions for the origin to judge (they guard writes and their races): not from here.
            return self._bypass(ex, b"fwd=request")
        miss = b"fwd=vary-miss" if varied else b"fwd=uri-miss"
        if entry is not None and b"authorization" in client and not entry.auth_ok:
            entry = None  # the stored response may not answer an authenticated request (RFC 9111 3.5)
            miss = b"fwd=miss"
        if entry is not None:
            age = now - entry.response_time + entry.initial_age
            decision = policy.use_decision(lifetime=entry.lifetime, age=age, response_cc=entry.cc,
                                           request_cc=request_cc, request_no_cache=no_cache)
            if decision == policy.FRESH:
                if entry.freq < 3:
                    entry.freq += 1
                self.counts["hit"] += 1
                return self._answer(ex, entry, now, client, self.name + b"; hit; ttl=%d" % int(entry.fresh_until - now))
            if decision == policy.STALE_OK:
                self.counts["stale"] += 1
                return self._answer(ex, entry, now, client,
                                    self.name + b"; hit; ttl=%d; detail=max-stale" % int(entry.fresh_until - now))
            stale_by = now - entry.fresh_until
            if (stale_by >= 0 and not no_cache and not entry.needs_check and "max-age" not in request_cc
                    and "min-fresh" not in request_cc and stale_by <= entry.swr):
                self.counts["stale"] += 1
                if not entry.refreshing and ex.route.upstream is not None:
                    entry.refreshing = True
                    ex.conn.loop.create_task(self._refresh(ex, key, entry))
                return self._answer(ex, entry, now, client,
                                    self.name + b"; hit; ttl=%d; detail=stale-while-revalidate" % int(-stale_by))
        if "only-if-cached" in request_cc:
            self.counts["miss"] += 1
            return Response(504, "not in cache\n", [(b"Cache-Status", self.name + b"; " + miss + b"; detail=only-if-cached")],
                            content_type="text/plain")
        state = _State(MISS, key)
        state.request_time = now
        state.headers = list(ex.headers)
        state.client = client
        collapsible = self.collapse and ex.method == b"GET" and b"range" not in client
        if collapsible:
            waiting = self.inflight.get(key)
            if waiting is not None and not waiting.done():
                # Another request is fetching or revalidating this key: wait for its result.
                state.entry = entry
                state.detail = miss if entry is None else b"fwd=stale"
                ex.state[STATE] = state
                return self._wait(ex, key, waiting, client)
        if entry is not None and (entry.etag is not None or entry.last_modified is not None):
            # Stale (or no-cache): ask the origin whether it changed, with our validators instead of the
            # client's own (the client's conditions are answered from the result).
            state.mode = REVALIDATE
            state.entry = entry
            # RFC 9211: "stale" when the stored response needed validating, "request" when the client asked.
            state.detail = b"fwd=stale" if now >= entry.fresh_until or entry.needs_check else b"fwd=request"
            ex.state[STATE] = state
            if collapsible and not entry.needs_check and not no_cache:
                state.pending = self.inflight[key] = ex.conn.loop.create_future()
                if self.collapse_shared:
                    return self._fetch_once_for_all(ex, state, key, client)
            self._go_upstream(ex, state)
            return None
        state.entry = entry  # kept for stale-if-error even when it cannot be revalidated
        state.detail = b"fwd=request" if no_cache else b"fwd=stale" if entry is not None else miss
        ex.state[STATE] = state
        if collapsible:
            state.pending = self.inflight[key] = ex.conn.loop.create_future()
            if self.collapse_shared:
                return self._fetch_once_for_all(ex, state, key, client)
        self.counts["miss"] += 1
        return None

    def _go_upstream(self, ex, state) -> None:
        """The request goes to the origin: a revalidation carries our validators instead of the client's
        own (the client's conditions are answered from the result)."""
        if state.mode != REVALIDATE:
            self.counts["miss"] += 1
            return
        entry = state.entry
        headers = [(n, v) for n, v in ex.headers if n.lower() not in _CONDITIONALS]
        if entry.etag is not None:
            headers.append((b"If-None-Match", entry.etag.encode("latin-1")))
        if entry.last_modified is not None:
            headers.append((b"If-Modified-Since", policy.format_http_date(entry.last_modified).encode()))
        ex.headers = headers
        self.counts["revalidation"] += 1

    # -- collapsing beyond this worker ------------------------------------------------------------------------
    def _fetch_once_for_all(self, ex, state, key: bytes, client: dict):
        """This request is its worker's first for `key` (its future holds the worker's other requests for
        it). With a store shared beyond the worker, it fetches only if it gets the key's lock (the disk
        store's lock file for the node's workers, a Redis key for the nodes); otherwise it waits for the
        holder's result like the others wait for it."""
        if self.disk is not None:
            got = self.disk.try_lock(key)
            if got is False:
                return self._wait_elsewhere(ex, state, key, client)
            if got:
                state.lock = True
            self._go_upstream(ex, state)
            return None
        return self._claim_remote(ex, state, key, client)

    async def _claim_remote(self, ex, state, key: bytes, client: dict):
        token = os.urandom(12).hex()
        got = await self.remote.lock(key, token, self.collapse_timeout)
        if state.finished:
            # The client went away while we asked: the log phase released the worker's waiters already.
            if got:
                ex.conn.loop.create_task(self.remote.unlock(key, token))
            return None
        if got:
            state.lock = token
            self._go_upstream(ex, state)
            return None
        return await self._wait_elsewhere(ex, state, key, client)

    async def _wait_elsewhere(self, ex, state, key: bytes, client: dict):
        """Another worker (disk store) or node (Redis) is fetching `key`: poll, with a growing pause, until
        its lock is gone (or collapse_timeout passed: it may be stuck), then answer from what it stored,
        or go to the origin as usual when it stored nothing usable (as the worker's own waiters do)."""
        self.counts["collapsed"] += 1
        state.collapsed = True
        deadline = monotonic() + self.collapse_timeout
        pause = 0.005
        variant_of = lambda names: _variant(names, ex.headers)  # noqa: E731
        entry = None
        try:
            while True:
                left = deadline - monotonic()
                if left <= 0:
                    break
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
                if state.finished:
                    break  # the client is gone
                if self.disk is not None:
                    if not self.disk.is_locked(key):
                        break
                elif not await self.remote.is_locked(key):
                    break
            if not state.finished:
                if self.disk is not None:
                    entry = self.disk.get(key, variant_of, MEMORY_OBJECT_MAX)
                else:
                    entry = await self.remote.get(key, variant_of)
                if entry is not None and entry.body is not None:
                    self.store.put(entry)  # where the worker's own waiters look when released
        finally:
            self._release(state)
        if state.finished:
            return None
        answer = self._collapsed_answer(ex, entry, client)
        if answer is None:
            self._go_upstream(ex, state)
        return answer

    async def _wait(self, ex, key: bytes, future, client: dict):
        """Collapsing: wait (bounded) for the request already fetching this key, then answer from what it
        stored; if it stored nothing usable, go to the origin as usual."""
        self.counts["collapsed"] += 1
        try:
            await asyncio.wait_for(asyncio.shield(future), self.collapse_timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        state = ex.state.get(STATE)
        if state is not None:
            state.collapsed = True
        slot = self.store.get(key)
        entry = None
        if slot is not None:
            entry = slot if type(slot) is Entry else slot.variants.get(_variant(slot.names, ex.headers))
        if entry is None and self.disk is not None:
            # Bodies over MEMORY_OBJECT_MAX stay in their file only (so do other workers' responses).
            entry = self.disk.get(key, lambda names: _variant(names, ex.headers), MEMORY_OBJECT_MAX)
            if entry is not None and entry.body is not None:
                self.store.put(entry)
        answer = self._collapsed_answer(ex, entry, client)
        if answer is None:
            self.counts["miss"] += 1
        return answer

    def _collapsed_answer(self, ex, entry: Entry | None, client: dict) -> Response | None:
        """The answer from what the request this one waited for stored, when it may be used; else None."""
        now = time()
        if entry is not None and now < entry.fresh_until and not entry.needs_check and (
                b"authorization" not in client or entry.auth_ok):
            self.counts["hit"] += 1
            return self._answer(ex, entry, now, client, self.name + b"; hit; ttl=%d; collapsed"
                                % int(entry.fresh_until - now))
        return None

    def _bypass(self, ex, detail: bytes):
        state = _State(BYPASS)
        state.detail = detail
        ex.state[STATE] = state
        self.counts["bypass"] += 1
        return None

    def _answer(self, ex, entry: Entry, now: float, client: dict, cache_status: bytes) -> Response:
        """The stored response as the answer to this request: 304 to a matching conditional, 206 to a
        range, the whole response otherwise (HEAD: the same head, no body)."""
        if ex.state is not None:
            state = ex.state.get(STATE)
            if state is not None:
                state.mode = SERVED
        age = int(now - entry.response_time + entry.initial_age)
        inm = client.get(b"if-none-match")
        ims = client.get(b"if-modified-since")
        if (inm is not None or ims is not None) and entry.status == 200 and policy.not_modified(
                if_none_match=inm.decode("latin-1") if inm is not None else None,
                if_modified_since=ims.decode("latin-1") if ims is not None else None,
                etag=entry.etag, last_modified=entry.last_modified, date=entry.date):
            response = self._response(entry, 304, b"", age, cache_status)
            response.headers._items[:] = [(n, v) for n, v in response.headers.raw
                                          if n.lower().decode("latin-1") in policy.NOT_MODIFIED_FIELDS
                                          or n in (b"Age", b"Cache-Status")]
            return response
        range_header = client.get(b"range")
        if range_header is not None and entry.status == 200 and ex.method == b"GET":
            if_range = client.get(b"if-range")
            if policy.if_range_matches(if_range.decode("latin-1") if if_range is not None else None,
                                       entry.etag, entry.last_modified):
                length = _length(entry)
                chosen = policy.byte_range(range_header.decode("latin-1"), length)
                if chosen == "unsatisfiable":
                    response = self._response(entry, 416, b"", age, cache_status,
                                              [(b"Content-Range", b"bytes */%d" % length)])
                    return response
                if chosen is not None:
                    first, last = chosen
                    return self._response(entry, 206, _body(entry, first, last + 1), age, cache_status,
                                          [(b"Content-Range", b"bytes %d-%d/%d" % (first, last, length))])
        return self._response(entry, entry.status, _body(entry), age, cache_status)

    # -- PURGE ------------------------------------------------------------------------------------------------
    def _purge_request(self, ex):
        import ipaddress

        try:
            address = ipaddress.ip_address(ex.client_ip)
        except ValueError:
            address = None
        if address is None or not any(address in net for net in self.purge_from):
            return Response(405, "PURGE is not allowed from this address\n", [(b"Allow", b"GET, HEAD")],
                            content_type="text/plain")
        url = self.url_of(ex)
        if self.shared.redis is not None:
            return self._purge_everywhere(url)
        purged = self.shared.purge("url", url)
        return Response(200, '{"purged": %d, "url": "%s"}\n' % (purged, url.replace('"', "%22")),
                        content_type="application/json")

    async def _purge_everywhere(self, url: str) -> Response:
        here, shared = await self.shared.purge_and_wait("url", url)
        return Response(200, '{"purged": %d, "purged_in_redis": %d, "url": "%s"}\n'
                        % (here, shared or 0, url.replace('"', "%22")), content_type="application/json")

    # -- response phase ---------------------------------------------------------------------------------------
    def response_filter(self, ex):
        st = ex._state
        state = st.get(STATE) if st is not None else None
        if state is None:
            return None
        mode = state.mode
        if mode == SERVED:
            return None
        status = ex.status
        headers = ex.response_headers_raw
        if mode == UNSAFE:
            if 200 <= status < 400 and not ex.error:
                self._invalidate(ex, headers)
            headers.append((b"Cache-Status", self.name + b"; fwd=method"))
            return None
        if mode == BYPASS:
            headers.append((b"Cache-Status", self.name + b"; " + state.detail))
            return None
        now = time()
        entry = state.entry
        if ex.error is not None or status >= 500:
            replacement = self._stale_on_error(ex, state, entry, now)
            if replacement is not None:
                self._release(state)
                return replacement
            if ex.error is not None:  # Bastion's own error page: never stored
                self._release(state)
                headers.append((b"Cache-Status", self.name + b"; " + state.detail + b"; fwd-status=%d" % status))
                return None
        if mode == REVALIDATE and status == 304:
            response = self._revalidated(ex, state, entry, headers, now)
            self._release(state)  # after the refreshed entry is where waiters in other workers look
            return response
        meta = self._storable(ex, state, status, headers, now)
        if meta is None:
            if (entry is not None and not entry.dead and ex.method == b"GET" and status < 500
                    and status not in (206, 304)):
                self._remove(entry)  # the origin has a new answer that is not to be stored (errors keep it)
            self._release(state)
            headers.append((b"Cache-Status", self.name + b"; " + state.detail + b"; fwd-status=%d" % status))
            return None
        state.meta = meta
        state.chunks = []
        if self.disk is not None:
            state.writer = self.disk.begin(meta)
        headers.append((b"Cache-Status", self.name + b"; " + state.detail + b"; fwd-status=%d; stored" % status))
        return None

    def _storable(self, ex, state, status: int, headers: list, now: float):
        """The parsed facts about a backend response if it may be stored, else None."""
        if ex.method != b"GET":
            return None  # (a 200 to a Range request is the full representation: storable like any other)
        fields: dict[str, list[str]] = {}
        for name, value in headers:
            fields.setdefault(name.lower().decode("latin-1"), []).append(value.decode("latin-1"))
        response_cc = policy.parse_cache_control(fields.get("cache-control", []))
        request_cc = {}
        client = state.client or {}
        if b"cache-control" in client:
            request_cc = policy.parse_cache_control([client[b"cache-control"].decode("latin-1")])
        vary = policy.vary_names(fields.get("vary", []))
        has_expires = "expires" in fields
        etag = fields.get("etag", [None])[0]
        last_modified = policy.parse_http_date(fields.get("last-modified", [None])[0])
        why_not = policy.storable(
            "GET", status, request_cc, response_cc, has_authorization=b"authorization" in client,
            has_set_cookie="set-cookie" in fields, has_expires=has_expires,
            has_validator=etag is not None or last_modified is not None, vary=vary, statuses=self.statuses,
            store_set_cookie=self.store_set_cookie, has_default_ttl=self.default_ttl is not None)
        if why_not is not None:
            return None
        content_length = fields.get("content-length")
        if content_length and content_length[0].isdigit() and int(content_length[0]) > self.max_object:
            return None
        date = policy.parse_http_date(fields.get("date", [None])[0])
        lifetime = policy.freshness_lifetime(
            response_cc, date=date, expires=fields.get("expires", [None])[0], has_expires=has_expires,
            last_modified=last_modified, status=status, response_time=now,
            heuristic_fraction=self.heuristic_fraction, heuristic_max=self.heuristic_max,
            default_ttl=self.default_ttl, max_ttl=self.max_ttl)
        initial_age = policy.corrected_initial_age(
            age_value=policy.parse_age(fields.get("age", [None])[0]), date=date,
            request_time=state.request_time or now, response_time=now)
        entry = Entry()
        entry.key = state.key
        entry.url = self.url_of(ex)
        entry.status = status
        left_out = policy.NOT_STORED | policy.fields_not_stored(response_cc, fields.get("connection", []))
        if self.store_set_cookie:
            left_out |= {"set-cookie"}  # stored without it: a cookie is never replayed to another client
        entry.headers = [(n, v) for n, v in headers if n.lower().decode("latin-1") not in left_out]
        entry.request_time = state.request_time or now
        entry.response_time = now
        entry.date = date
        entry.initial_age = initial_age
        entry.lifetime = lifetime
        entry.fresh_until = now + lifetime - initial_age
        entry.cc = response_cc
        entry.etag = etag
        entry.last_modified = last_modified
        entry.needs_check = policy.unqualified(response_cc, "no-cache")
        entry.auth_ok = "public" in response_cc or "s-maxage" in response_cc or "must-revalidate" in response_cc
        entry.swr = policy.stale_window(response_cc, "stale-while-revalidate", self.swr)
        entry.sie = policy.stale_window(response_cc, "stale-if-error", self.sie)
        tags = []
        for field in ("surrogate-key", "cache-tag"):
            for value in fields.get(field, []):
                tags += [t for t in value.replace(",", " ").split() if t]
        entry.tags = tuple(tags)
        if vary:
            entry.vary = tuple(vary)
            entry.variant = _variant(entry.vary, state.headers or ex.headers)
        return entry

    def response_body_filter(self, ex, data: bytes, end: bool) -> bytes:
        st = ex._state
        state = st.get(STATE) if st is not None else None
        if state is None or state.chunks is None:
            return data
        writer = state.writer
        if data:
            state.size += len(data)
            if state.size > self.max_object:
                state.chunks = None
                if writer is not None:
                    writer.abort()
                    state.writer = None
                self._release(state)
                return data
            if writer is not None:
                writer.write(data)
                if state.size > MEMORY_OBJECT_MAX:
                    state.meta.body = None  # large: it goes to the file only, not kept in memory
                    state.chunks = []
                    return data
            state.chunks.append(data)
        if end:
            entry = state.meta
            state.chunks, chunks = None, state.chunks
            if writer is not None:
                writer.commit()
                state.writer = None
                self.counts["stored"] += 1
                if entry.body is None:
                    self._release(state)
                    return data
            entry.body = b"".join(chunks)
            state.put_task = self._put(entry, to_disk=False)
            self._release(state)
        return data

    def _put(self, entry: Entry, to_disk: bool = True):
        """Store `entry`; the task storing it in Redis, if any."""
        entry.head_bytes = b"".join(n + b": " + v + b"\r\n" for n, v in entry.headers)
        entry.size = len(entry.body) + len(entry.head_bytes) + len(entry.key) + 400
        before = self.store.evictions
        stored = self.store.put(entry)
        self.counts["eviction"] += self.store.evictions - before
        task = None
        if self.remote is not None:
            task = asyncio.get_event_loop().create_task(self.remote.put(entry))
            stored = True
        if self.disk is not None:
            if not to_disk:
                return None  # written while it streamed, and counted then
            self.disk.rewrite(entry)
            stored = True
        if stored:
            self.counts["stored"] += 1
        return task

    def _remove(self, entry: Entry) -> None:
        self.store.remove(entry)
        if self.disk is not None:
            self.disk.remove(entry)
        if self.remote is not None:
            asyncio.get_event_loop().create_task(self.remote.remove(entry))

    def _release(self, state) -> None:
        future = state.pending
        if future is not None:
            state.pending = None
            if self.inflight.get(state.key) is future:
                del self.inflight[state.key]
            if not future.done():
                future.set_result(None)
        lock = state.lock
        if lock is not None:
            state.lock = None
            if lock is True:
                self.disk.unlock(state.key)
            else:
                asyncio.get_event_loop().create_task(self.remote.unlock(state.key, lock, state.put_task))

    def _revalidated(self, ex, state, entry: Entry, headers: list, now: float) -> Response:
        """The origin said 304 to our conditional request: refresh the stored headers and freshness (RFC
        9111 4.3.4) and answer the client from the stored response."""
        self.counts["revalidated"] += 1
        self._freshen(entry, headers, state.request_time, now)
        if self.disk is not None:
            self.disk.rewrite(entry)
        if self.remote is not None:
            state.put_task = asyncio.get_event_loop().create_task(self.remote.put(entry))
        response = self._answer(ex, entry, now, state.client or {},
                                self.name + b"; " + state.detail + b"; fwd-status=304")
        # A cookie set by this 304 is for this client only: returned, never stored.
        response.headers.raw.extend((n, v) for n, v in headers if n.lower() == b"set-cookie")
        return response

    def _freshen(self, entry: Entry, headers: list, request_time: float, now: float) -> None:
        etag = None
        for n, v in headers:
            if n.lower() == b"etag":
                etag = v.decode("latin-1")
        if etag is not None and entry.etag is not None and etag != entry.etag:
            return  # a 304 for another representation: the stored one is not updated
        updates = {}
        for n, v in headers:
            lname = n.lower().decode("latin-1")
            if lname in policy.NOT_UPDATED or lname == "set-cookie":
                continue
            updates.setdefault(lname, []).append((n, v))
        kept = [(n, v) for n, v in entry.headers if n.lower().decode("latin-1") not in updates]
        for values in updates.values():
            kept += values
        fields: dict[str, list[str]] = {}
        for n, v in kept:
            fields.setdefault(n.lower().decode("latin-1"), []).append(v.decode("latin-1"))
        response_cc = policy.parse_cache_control(fields.get("cache-control", []))
        date = policy.parse_http_date(fields.get("date", [None])[0])
        has_expires = "expires" in fields
        age_304 = 0
        for n, v in headers:
            if n.lower() == b"age":
                age_304 = policy.parse_age(v.decode("latin-1"))
        entry.headers = kept
        entry.cc = response_cc
        entry.date = date
        entry.request_time = request_time
        entry.response_time = now
        entry.initial_age = policy.corrected_initial_age(age_value=age_304, date=date,
                                                         request_time=request_time, response_time=now)
        entry.lifetime = policy.freshness_lifetime(
            response_cc, date=date, expires=fields.get("expires", [None])[0], has_expires=has_expires,
            last_modified=entry.last_modified, status=entry.status, response_time=now,
            heuristic_fraction=self.heuristic_fraction, heuristic_max=self.heuristic_max,
            default_ttl=self.default_ttl, max_ttl=self.max_ttl)
        entry.fresh_until = now + entry.lifetime - entry.initial_age
        entry.needs_check = policy.unqualified(response_cc, "no-cache")
        entry.swr = policy.stale_window(response_cc, "stale-while-revalidate", self.swr)
        entry.sie = policy.stale_window(response_cc, "stale-if-error", self.sie)
        entry.head_bytes = b"".join(n + b": " + v + b"\r\n" for n, v in entry.headers)
        entry.hit_until = 0.0
        entry.hit_response = None

    def _stale_on_error(self, ex, state, entry: Entry | None, now: float) -> Response | None:
        """stale-if-error (RFC 5861) for 5xx answers and failed backends; the grace period when no backend
        could be reached at all."""
        if entry is None or entry.dead:
            return None
        window = entry.sie
        if ex.error in _DOWN:
            if not policy.revalidation_required(entry.cc):
                window = max(window, self.grace)
        elif ex.error is not None and ex.error not in _BACKEND_ERRORS:
            return None
        stale_by = now - entry.fresh_until
        if stale_by > window:
            return None
        self.counts["stale"] += 1
        detail = b"; detail=grace" if ex.error in _DOWN and stale_by > entry.sie else b""
        return self._answer(ex, entry, now, state.client or {},
                            self.name + b"; hit; ttl=%d; fwd=stale; fwd-status=%d%s" % (int(-stale_by), ex.status, detail))

    # -- invalidation (RFC 9111 4.4) -----------------------------------------------------------------------------
    def _invalidate(self, ex, headers: list) -> None:
        location = content_location = None
        for n, v in headers:
            lname = n.lower()
            if lname == b"location":
                location = v.decode("latin-1")
            elif lname == b"content-location":
                content_location = v.decode("latin-1")
        base = f"{ex.scheme}://{ex.host_header.lower().decode('latin-1')}"
        urls = [self.url_of(ex)]
        for target in policy.invalidation_targets(ex.scheme, ex.host_header.decode("latin-1"), location,
                                                  content_location):
            urls.append(base + target)
        for url in urls:
            n = self.shared.purge("url", url)
            self.counts["invalidated"] += n

    # -- background refresh (stale-while-revalidate) ----------------------------------------------------------------
    async def _refresh(self, ex, key: bytes, entry: Entry) -> None:
        from bastion.cache.fetch import fetch

        lock = None
        put_task = None
        try:
            if self.collapse_shared:
                lock = await self._refresh_lock(key)
                if lock is None:
                    return  # another worker or node is fetching the key: its result will do
            group = ex.route.upstream
            peer = group.select(ex)
            if peer is None:
                return
            headers = [(n, v) for n, v in ex.headers if n.lower() not in _CONDITIONALS]
            if entry.etag is not None:
                headers.append((b"If-None-Match", entry.etag.encode("latin-1")))
            if entry.last_modified is not None:
                headers.append((b"If-Modified-Since", policy.format_http_date(entry.last_modified).encode()))
            target = ex.upstream_target()
            request_time = time()
            result = await fetch(peer, b"GET", target, headers, ex.route.read_timeout, self.max_object)
            now = time()
            if result is None or entry.dead:
                return
            self.counts["revalidation"] += 1
            if result.status == 304:
                self.counts["revalidated"] += 1
                self._freshen(entry, result.headers, request_time, now)
                if self.disk is not None:
                    self.disk.rewrite(entry)
                if self.remote is not None:
                    await self.remote.put(entry)  # the other nodes' copies are as stale as ours was
                return
            if result.status >= 500:
                return
            clean = [(n, v) for n, v in result.headers if n.lower() not in (b"transfer-encoding", b"connection")]
            state = _State(MISS, key)
            state.request_time = request_time
            state.headers = headers
            state.client = {}
            fake = _Fetched(ex, result.status)
            fresh = self._storable(fake, state, result.status, clean, now)
            if fresh is None:
                self._remove(entry)
                return
            fresh.body = result.body
            put_task = self._put(fresh)
        except Exception:  # noqa: BLE001 - a failed refresh leaves the stale entry; it is logged
            log.exception("background refresh of %r failed", key)
        finally:
            entry.refreshing = False
            if lock is True:
                self.disk.unlock(key)
            elif lock:
                await self.remote.unlock(key, lock, put_task)

    async def _refresh_lock(self, key: bytes):
        """The key's lock for a background refresh: True (disk store) or a token (Redis); "" to refresh
        without one (the lock file failed); None when another worker or node holds it."""
        if self.disk is not None:
            got = self.disk.try_lock(key)
            return None if got is False else True if got else ""
        token = os.urandom(12).hex()
        return token if await self.remote.lock(key, token, self.collapse_timeout) else None

    # -- log phase --------------------------------------------------------------------------------------------
    def logging(self, ex) -> None:
        st = ex._state
        if st is not None:
            state = st.get(STATE)
            if state is not None:
                state.finished = True
                if state.pending is not None or state.lock is not None:
                    self._release(state)


class _Fetched:
    """What _storable reads from an exchange, for a background fetch's response."""

    __slots__ = ("method", "scheme", "host_header", "path", "query", "headers", "status", "error")

    def __init__(self, ex, status: int):
        self.method = b"GET"
        self.scheme = ex.scheme
        self.host_header = ex.host_header
        self.path = ex.path
        self.query = ex.query
        self.headers = ex.headers
        self.status = status
        self.error = None


def _length(entry: Entry) -> int:
    return len(entry.body) if entry.body is not None else entry.file[2]


def _body(entry: Entry, start: int = 0, end: int | None = None):
    """The body (or a slice of it): bytes, or a FileBody when it stays in the disk store's file."""
    if entry.body is not None:
        return entry.body if start == 0 and end is None else entry.body[start:end]
    path, offset, size = entry.file
    end = size if end is None else end
    return FileBody(path, offset + start, end - start)


def _variant(names: tuple, headers: list) -> tuple:
    """The secondary cache key: the request's normalised values of the fields the response varies on."""
    values = []
    for name in names:
        bname = name.encode("latin-1")
        found = [v.decode("latin-1") for n, v in headers if n.lower() == bname]
        values.append(policy.normalize_vary_value(name, found))
    return tuple(values)


def _cookies(headers: list) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, v in headers:
        if n.lower() == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                if name and name not in out:
                    out[name] = value
    return out
