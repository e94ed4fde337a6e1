"""The compiled, immutable form of a configuration that workers serve from. A reload builds a new one;
connections keep the runtime they were accepted under until they close."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

from bastion.config.schema import Config
from bastion.http.known_heads import KnownRequests

if TYPE_CHECKING:
    from bastion.upstream.pool import UpstreamGroup


class CompiledRoute:
    __slots__ = (
        "name",
        "index",
        "priority",
        "host_accepts",
        "conditions",
        "upstream",
        "filters",
        "on_request",
        "on_upstream_request",
        "on_response",
        "on_response_body",
        "on_log",
        "connect_timeout",
        "read_timeout",
        "try_timeout",
        "client_body_timeout",
        "websocket_idle",
        "body_limit",
        "body_min_rate",
        "upgrade_any",
        "upgrade_allowed",
        "description",
        "response_runs",
        "response_wants",
    )

    def __init__(self, name: str, index: int, priority: int = 0):
        self.name = name
        self.index = index
        self.priority = priority
        self.host_accepts: Any = None
        self.conditions: tuple = ()
        self.upstream: UpstreamGroup | None = None
        self.filters: list = []
        self.on_request: tuple = ()
        self.on_upstream_request: tuple = ()
        self.on_response: tuple = ()
        self.on_response_body: tuple = ()
        self.on_log: tuple = ()
        self.connect_timeout = 5.0
        self.read_timeout = 60.0
        self.try_timeout = 60.0  # read timeout of one try: the upstream's per_try_timeout, else read_timeout
        self.client_body_timeout = 60.0
        self.websocket_idle = 3600.0
        self.body_limit = 0
        self.body_min_rate = 0  # bytes per second a request body must average after the grace period
        self.upgrade_any = False
        self.upgrade_allowed: frozenset = frozenset()
        self.description = ""
        self.response_runs: dict[int, bool] = {}  # status -> whether some response filter wants it
        self.response_wants: Any = None  # the response_statuses of each of on_response, once asked

    def response_statuses(self) -> tuple:
        """For each response filter (on_response), the statuses it handles, or None for all. A filter says
        which with a `response_statuses` attribute (a container of ints); it is not called for others.
        (Read once on first use: on_response is final by then.)"""
        wants = self.response_wants
        if wants is None:
            wants = self.response_wants = tuple(
                getattr(getattr(method, "__self__", None), "response_statuses", None) for method in self.on_response)
        return wants

    def response_phase_runs(self, status: int) -> bool:
        """Whether some response filter handles a response of `status`; when none does, the response phase
        (and the copy of the header list its filters may change) is skipped."""
        runs = self.response_runs.get(status)
        if runs is None:
            runs = False
            for statuses in self.response_statuses():
                if statuses is None or status in statuses:
                    runs = True
                    break
            self.response_runs[status] = runs
        return runs

    def allows_upgrade(self, protocol: bytes | None) -> bool:
        if protocol is None:
            return False
        return self.upgrade_any or protocol.split(b"/", 1)[0].strip() in self.upgrade_allowed

    def __repr__(self) -> str:
        return f"<route {self.name}>"


@mypyc_attr(native_class=False)  # its fields are the model's, set at run time: a plain Python class
class PlainSettings:
    """The fields of a configuration section as plain attributes. Pydantic models answer attribute reads
    through a __getattr__ hook, which the interpreter cannot specialise: per-request code reads these."""

    def __init__(self, model: Any) -> None:
        for name in type(model).model_fields:
            setattr(self, name, getattr(model, name))


@dataclass
class Runtime:
    config: Config
    source: str
    router: Any
    routes: list
    upstream_groups: list
    fallback_route: CompiledRoute
    periodic: list = field(default_factory=list)
    closers: list = field(default_factory=list)
    health_table: Any = None
    checked: list = field(default_factory=list)
    metrics: Any = None
    listeners: dict = field(default_factory=dict)
    acme_names: list = field(default_factory=list)
    cert_files: list = field(default_factory=list)
    security: Any = None  # bastion.security.setup.SecuritySetup (bans for the admin API)
    connection_guard: Any = None  # asked by each accepted connection when connection-level limits are on
    cache: Any = None  # bastion.cache.runtime.CacheRuntime when a route caches
    # Request heads seen before, byte for byte, with what parsing them gave (bastion/http/known_heads.py)
    # (one table per scheme: a remembered head's memo may hold what depends on it, such as a cache key)
    known_requests: KnownRequests = field(default_factory=KnownRequests)
    known_requests_https: KnownRequests = field(default_factory=KnownRequests)
    # Some route passes WebSocket to an HTTP/1.1 upstream: HTTP/2 clients are offered extended CONNECT
    # (RFC 8441, SETTINGS_ENABLE_CONNECT_PROTOCOL) to open WebSockets over HTTP/2.
    websocket_over_h2: bool = False
    # This worker is draining (set by bastion.server.worker with Worker.draining): a field of this compiled
    # class, because every response asks.
    draining: bool = False

    def __post_init__(self) -> None:
        self.limits = PlainSettings(self.config.limits)
        self.timeouts = PlainSettings(self.config.timeouts)
        # The settings every request reads, as native fields (the PlainSettings above are Python objects).
        self.keepalive_timeout: float = self.config.timeouts.keepalive
        self.requests_per_connection: int = self.config.limits.requests_per_connection
        self.request_line_limit: int = self.config.limits.request_line

    def tick(self, now: float) -> None:
        if self.health_table is not None:
            from bastion.upstream.health import read_health_table

            read_health_table(self.health_table, self.checked)
        for group in self.upstream_groups:
            group.sweep(now)
        for callback in self.periodic:
            callback()

    def close(self) -> None:
        for group in self.upstream_groups:
            group.close_idle()
        for callback in self.periodic:
            callback()
        for callback in self.closers:
            callback()
