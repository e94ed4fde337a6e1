"""Turn a validated Config into the immutable Runtime workers serve from: the router, the upstream
groups, and each route's filter chain compiled into per-phase tuples."""

from __future__ import annotations

import logging

from bastion.config.loader import ConfigError, ConfigProblem, load_config
from bastion.config.schema import Config, Route, Upstream
from bastion.filters.answers import FixedResponse, Redirect
from bastion.filters.backend_identity import ServerHeader
from bastion.filters.forwarding import ForwardingHeaders
from bastion.filters.header_ops import RequestHeaders, ResponseHeaders
from bastion.filters.rewrite import PathRewrite
from bastion.filters.sticky import StickyCookieFilter
from bastion.filters.tls import ClientCertificateHeaders, HttpsRedirect, ListenerInfo, StrictTransportSecurity
from bastion.filters.acme import AcmeChallenge
from bastion.tls.contexts import CertificateError, certificate_files, listener_context, upstream_context
from bastion.filters.trust import TrustedProxies
from bastion.observability.accesslog import AccessLog
from bastion.observability.metrics import Metrics
from bastion.proxy.filters import FilterLoadError, load_filter, phase_methods
from bastion.proxy.runtime import CompiledRoute, Runtime
from bastion.routing import matchers
from bastion.routing.router import Router
from bastion.security.setup import SecuritySetup
from bastion.upstream.discovery import FileSource, NameSource, SrvSource, Target, is_ip
from bastion.upstream.health import assign_health_table
from bastion.upstream.locality import ClientLocator, LocalityChooser
from bastion.upstream.pool import Peer, UpstreamGroup


def _group(name: str, spec: Upstream, hidden: frozenset) -> UpstreamGroup:
    tls_context = None
    if any(server.tls for server in spec.servers):
        tls_context = upstream_context(spec.tls, spec.protocol == "h2")
        if spec.tls is not None and spec.tls.insecure_skip_verify:
            logging.getLogger("bastion.config").warning(
                "upstream %s: insecure_skip_verify is on: backend certificates are not verified", name)

    def new_peer(t, tls: bool = False) -> Peer:
        peer = Peer(t.host, t.port, t.weight, spec.keepalive.max_idle, spec.keepalive.idle_timeout, hidden,
                    backup=t.backup, drain=t.drain)
        peer.region, peer.zone = t.region, t.zone
        if tls:
            peer.tls = tls_context
            peer.server_name = (spec.tls.server_name if spec.tls is not None and spec.tls.server_name else None) or t.host
        return peer

    peers = []
    sources: list = []
    for server in spec.servers:
        if server.srv is not None:
            sources.append(SrvSource(server.srv, server.backup, server.drain, server.region, server.zone))
            continue
        host, port = server.host_port
        if host == "localhost":
            host = "127.0.0.1"
        if is_ip(host) or server.tls:
            peers.append(new_peer(Target(host, port, server.weight, server.backup, server.drain, server.region,
                                         server.zone), server.tls))
        else:
            sources.append(NameSource(host, port, server.weight, server.backup, server.drain, server.region, server.zone))
    if spec.servers_file:
        sources.append(FileSource(spec.servers_file))
    group = UpstreamGroup(name, peers, spec, sources, new_peer)
    # HTTP/2 to the servers: the client side of bastion.http.h2_upstream, per group
    group.http2 = spec.protocol == "h2"
    return group


def _user_filters(refs, where: str, source: str, problems: list) -> list:
    out = []
    for index, ref in enumerate(refs):
        try:
            out.append(load_filter(ref.use, dict(ref.with_)))
        except FilterLoadError as exc:
            problems.append(ConfigProblem(source, f"{where}[{index}].use", str(exc)))
    return out


def _conditions(route: Route) -> tuple:
    match = route.match
    conditions = []
    if match.path is not None:
        if match.path.exact is not None:
            conditions.append(matchers.path_exact(match.path.exact))
        elif match.path.prefix is not None:
            if match.path.prefix != "/":
                conditions.append(matchers.path_prefix(match.path.prefix))
        else:
            conditions.append(matchers.path_regex(match.path.regex))
    if match.methods:
        conditions.append(matchers.method_in(match.methods))
    for name, header in match.headers.items():
        conditions.append(matchers.header_matches(name, header.exact, header.regex, header.present))
    return tuple(conditions)


def _describe(route: Route) -> str:
    match = route.match
    parts = []
    if match.host:
        parts.append("host " + "|".join(match.host))
    if match.path is not None:
        kind = "exact" if match.path.exact is not None else "regex" if match.path.regex is not None else "prefix"
        parts.append(f"path {kind} {match.path.exact or match.path.regex or match.path.prefix}")
    if match.methods:
        parts.append("methods " + ",".join(match.methods))
    for name in match.headers:
        parts.append(f"header {name}")
    return " and ".join(parts) or "everything"


def _cache_safe(method) -> bool:
    return getattr(getattr(method, "__self__", None), "cache_safe_response", False)


def _phase_tuples(route: CompiledRoute) -> None:
    route.on_request = phase_methods(route.filters, "request_filter")
    route.on_upstream_request = phase_methods(route.filters, "upstream_request_filter")
    route.on_response = phase_methods(route.filters, "response_filter")
    route.on_response_body = phase_methods(route.filters, "response_body_filter")
    route.on_log = phase_methods(route.filters, "logging")


def compile_config(config: Config, source: str = "<config>") -> Runtime:
    problems: list[ConfigProblem] = []
    proxy = config.proxy
    trusted = TrustedProxies(list(config.trusted_proxies))
    security = SecuritySetup(config, trusted)
    hidden = {n.lower().encode() for n in proxy.hide_headers}
    if proxy.request_id_header:
        hidden.add(proxy.request_id_header.lower().encode())  # Bastion's own id is the one that counts
    hidden = frozenset(hidden)
    locator_box: list = []

    def locator():
        if not locator_box:
            locator_box.append(ClientLocator(config.locality, trusted))
        return locator_box[0]

    def make_group(name, spec):
        group = _group(name, spec, hidden)
        if spec.locality is not None and spec.locality.enabled:
            group.locality = LocalityChooser(group, spec.locality)
            try:
                group.locator = locator()
            except Exception as exc:  # noqa: BLE001 - e.g. an unreadable MaxMind database
                problems.append(ConfigProblem(source, "locality", f"cannot set up client locality: {exc}"))
        return group

    try:
        groups = {name: make_group(name, spec) for name, spec in config.upstreams.items()}
    except CertificateError as exc:
        raise ConfigError([ConfigProblem(source, "upstreams", str(exc))]) from None

    # Filters every route gets, in this order: our Server header (if configured), forwarding headers,
    # the global user filters; then the route's own; the log phase ends with the access log and metrics.
    # Hidden backend headers (proxy.hide_headers) are dropped by the upstream connection itself, in the
    # same pass that drops hop-by-hop headers.
    forwarding = ForwardingHeaders(trusted, proxy.x_forwarded, proxy.forwarded, proxy.via,
                                   proxy.request_id_header, proxy.preserve_host)
    global_user = _user_filters(config.filters, "filters", source, problems)
    metrics = Metrics()
    tail = security.tail() + [metrics]
    access_log = None
    if config.access_log.enabled:
        access_log = AccessLog(config.access_log.format, config.access_log.path)
        tail.insert(len(tail) - 1, access_log)
    head = ([forwarding] if forwarding.active else []) + global_user
    if proxy.server_header:
        head.insert(0, ServerHeader(proxy.server_header))

    # Listeners: TLS contexts (certificates checked now, so a bad one is a start-up error), and the
    # listener-level behaviours, which are filters like everything else.
    listeners = {}
    acme_names: list[list[str]] = []
    cert_files: list[str] = []
    for index, spec in enumerate(config.listeners):
        info = ListenerInfo(spec)
        if spec.tls is not None:
            try:
                info.tls = listener_context(spec.tls, config.acme, config.http2.enabled)
            except CertificateError as exc:
                problems.append(ConfigProblem(source, f"listeners[{index}].tls.certificates", str(exc)))
            for c in spec.tls.certificates:
                if c.acme is not None:
                    acme_names.append(list(c.acme))
                try:
                    cert_files.extend(certificate_files(c, config.acme))  # watched for changes by the master
                except CertificateError:
                    pass  # already reported above
        listeners[spec.address] = info
    if any(info.redirect_port for info in listeners.values()):
        head.insert(0, HttpsRedirect())
    if acme_names and config.acme.challenge == "http-01":
        head.insert(0, AcmeChallenge(config.acme.storage))  # answered before any redirect to HTTPS
    if any(info.hsts for info in listeners.values()):
        head.insert(0, StrictTransportSecurity())
    cert_headers = {h.encode() for spec in config.listeners if spec.tls is not None and spec.tls.client_auth is not None
                    for h in (spec.tls.client_auth.subject_header, spec.tls.client_auth.fingerprint_header) if h}
    if cert_headers:
        head.append(ClientCertificateHeaders(cert_headers))
    # Access lists and bans come before anything else a request meets.
    head[:0] = security.head()

    waf_filters: dict = {}
    if config.waf is not None or any(spec.waf is not None for spec in config.routes):
        from bastion.security.waf import build_filters  # loads libmodsecurity only when a WAF is configured

        waf_filters, waf_problems = build_filters(
            config, config.routes, [spec.name or f"route-{i}" for i, spec in enumerate(config.routes)])
        problems.extend(ConfigProblem(source, where, message) for where, message in waf_problems)

    cache_runtime = None
    if any(spec.cache is not None and spec.cache.enabled for spec in config.routes):
        from bastion.cache.runtime import CacheRuntime

        cache_runtime = CacheRuntime(config.cache)

    timeouts = config.timeouts
    routes = []
    for index, spec in enumerate(config.routes):
        route = CompiledRoute(spec.name or f"route-{index}", index, spec.priority)
        route.host_accepts = matchers.host_accepts(spec.match.host)
        route.conditions = _conditions(spec)
        route.description = _describe(spec)
        filters = list(head) + security.route_front(spec, route.name, config)
        if index in waf_filters:
            # After access lists and rate limits (cheap refusals first), before rewrites: the WAF sees the
            # request as the client sent it.
            filters.append(waf_filters[index])
        if spec.rewrite is not None:
            rw = spec.rewrite
            filters.append(PathRewrite(rw.strip_prefix, rw.add_prefix,
                                       rw.regex.pattern if rw.regex else None,
                                       rw.regex.replacement if rw.regex else ""))
        if spec.request_headers is not None:
            filters.append(RequestHeaders(spec.request_headers))
        if spec.response_headers is not None:
            filters.append(ResponseHeaders(spec.response_headers))
        filters += _user_filters(spec.filters, f"routes[{index}].filters", source, problems)
        group_spec = config.upstreams.get(spec.upstream) if isinstance(spec.upstream, str) else spec.upstream
        if group_spec is not None and group_spec.balance == "cookie":
            sticky_group = groups[spec.upstream] if isinstance(spec.upstream, str) else None
            sticky_index = len(filters)
        else:
            sticky_index = None
        if spec.redirect is not None:
            try:
                filters.append(Redirect(spec.redirect.to, spec.redirect.status))
            except ValueError as exc:
                problems.append(ConfigProblem(source, f"routes[{index}].redirect.to", str(exc)))
        elif spec.respond is not None:
            r = spec.respond
            filters.append(FixedResponse(r.status, r.body, r.content_type, r.headers))
        elif isinstance(spec.upstream, str):
            route.upstream = groups[spec.upstream]
        else:
            route.upstream = groups.setdefault(f"{route.name}", make_group(route.name, spec.upstream))
        if sticky_index is not None:
            filters.insert(sticky_index, StickyCookieFilter(sticky_group or route.upstream))
        cache_filter = None
        if spec.cache is not None and spec.cache.enabled:
            from bastion.cache.filter import HttpCache

            # Last in the request phase (auth and the like decide first), but first to see the backend's
            # response head and body, before other filters add to them.
            cache_filter = HttpCache(route.name, spec.cache, cache_runtime)
            filters.append(cache_filter)
        route.filters = filters + security.route_back(spec, route.upstream) + tail
        _phase_tuples(route)
        if cache_filter is not None:
            # Response filters whose result depends only on the response (security headers, hidden backend
            # Locations) run before the cache stores it, so hits need not run them again; the rest after.
            own = cache_filter.response_filter
            others = [f for f in route.on_response if f != own]
            safe = tuple(f for f in others if _cache_safe(f))
            route.on_response = safe + (own,) + tuple(f for f in others if not _cache_safe(f))
            route.on_response_body = (cache_filter.response_body_filter,) + tuple(
                f for f in route.on_response_body if f != cache_filter.response_body_filter)
        rt = spec.timeouts
        route.connect_timeout = rt.connect if rt.connect is not None else timeouts.connect
        route.read_timeout = rt.upstream_read if rt.upstream_read is not None else timeouts.upstream_read
        route.try_timeout = (route.upstream.per_try_timeout if route.upstream is not None else None) or route.read_timeout
        route.client_body_timeout = rt.client_body if rt.client_body is not None else timeouts.client_body
        route.websocket_idle = rt.websocket_idle if rt.websocket_idle is not None else timeouts.websocket_idle
        route.body_limit = spec.limits.body if spec.limits.body is not None else config.limits.body
        route.body_min_rate = spec.limits.body_min_rate if spec.limits.body_min_rate is not None else config.limits.body_min_rate
        allowed = [p.lower() for p in spec.upgrade]
        route.upgrade_any = "*" in allowed
        route.upgrade_allowed = frozenset(p.encode() for p in allowed if p != "*")
        routes.append(route)

    if problems:
        raise ConfigError(problems)

    fallback = CompiledRoute("", -1)
    fallback.filters = head + security.fallback_front() + security.fallback_back() + tail
    fallback.body_limit = config.limits.body
    fallback.body_min_rate = config.limits.body_min_rate
    _phase_tuples(fallback)

    runtime = Runtime(
        config=config,
        source=source,
        router=Router(routes),
        routes=routes,
        upstream_groups=list(groups.values()),
        fallback_route=fallback,
    )
    runtime.metrics = metrics
    runtime.listeners = listeners
    runtime.websocket_over_h2 = any(
        r.upstream is not None and not r.upstream.http2 and r.allows_upgrade(b"websocket") for r in routes)
    runtime.acme_names = acme_names
    runtime.cert_files = cert_files
    runtime.health_table, runtime.checked = assign_health_table(runtime.upstream_groups)
    metrics.groups = runtime.upstream_groups
    runtime.periodic.append(metrics.flush)
    runtime.periodic.extend(security.periodic)
    runtime.security = security
    runtime.connection_guard = security.connection_guard
    if cache_runtime is not None:
        runtime.cache = cache_runtime
        runtime.periodic.append(cache_runtime.flush)
    if access_log is not None:
        runtime.periodic.append(access_log.flush)
    return runtime


def load_runtime(path: str) -> Runtime:
    """Read, validate and compile in one step; raises ConfigError."""
    return compile_config(load_config(path), str(path))
