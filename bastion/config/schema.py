"""The configuration file's shape: one pydantic model per section.

Every field has the default a newcomer would want; docs/configuration.md documents each one. Models are
strict about unknown keys so that a typo is an error with a field path, not a silently ignored option.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from bastion.config.units import Duration, Size


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def split_host_port(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """'127.0.0.1:8080', ':8080', '8080', '[::1]:8080' -> (host, port)."""
    text = str(value).strip()
    if text.isdigit():
        host, port_text = default_host, text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{value!r} is not an address; use [IPv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} is not an address; use host:port")
        host = host or default_host
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{value!r} has no valid port (1-65535)")
    return host, int(port_text)


class Certificate(Section):
    cert: str | None = Field(None, description="PEM certificate chain file")
    key: str | None = Field(None, description="PEM private key file")
    acme: list[str] | None = Field(None, description="host names to get a certificate for over ACME")

    @field_validator("acme", mode="before")
    @classmethod
    def _names(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _files_or_acme(self):
        if self.acme is not None:
            if self.cert or self.key:
                raise ValueError("give cert and key, or acme, not both")
            if not self.acme:
                raise ValueError("acme needs at least one host name")
        elif not (self.cert and self.key):
            raise ValueError("give both cert and key (or acme: [names])")
        return self


class Acme(Section):
    directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    email: str | None = None
    storage: str = Field("/var/lib/bastion/acme", description="account key, certificates, pending challenges")
    ca_file: str | None = Field(None, description="CA to trust for the ACME server's own HTTPS (test servers)")
    renew_before: Duration = 30 * 86400.0
    timeout: Duration = 90.0
    check_interval: Duration = 60.0
    retry_initial: Duration = 10.0
    retry_max: Duration = 3600.0


class Hsts(Section):
    max_age: Duration = 31536000.0
    include_subdomains: bool = False
    preload: bool = False


class ClientAuth(Section):
    mode: Literal["optional", "required"] = "required"
    ca: str = Field(description="PEM file of the CA(s) that client certificates must chain to")
    subject_header: str | None = Field("X-Client-Subject", description="passes the verified subject to backends")
    fingerprint_header: str | None = Field("X-Client-Fingerprint", description="passes the SHA-256 fingerprint")


class ListenerTls(Section):
    certificates: list[Certificate] = Field(min_length=1, description="chosen by SNI; the first is the default")
    profile: Literal["intermediate", "modern"] = Field("intermediate", description="Mozilla's TLS profiles")
    hsts: Hsts | None = None
    client_auth: ClientAuth | None = None


class UpstreamTls(Section):
    ca: str | None = Field(None, description="PEM CA file to verify backends with; default: the system's")
    server_name: str | None = Field(None, description="SNI and the name checked; default: the server's host")
    client_cert: str | None = Field(None, description="certificate Bastion presents to backends (mTLS)")
    client_key: str | None = None
    insecure_skip_verify: bool = Field(False, description="development only: no verification at all")


class Listener(Section):
    address: str = Field(description="host:port to listen on")
    name: str | None = None
    tls: ListenerTls | None = None
    redirect_https: bool | int = Field(False, description="answer 308 to https:// (true: port 443, or a port)")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        if isinstance(value, (str, int)):
            return {"address": str(value)}
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_host_port(value)
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.address)


class Admin(Section):
    address: str = "127.0.0.1:9090"

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_host_port(value, "127.0.0.1")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.address, "127.0.0.1")


class AccessLog(Section):
    enabled: bool = True
    format: Literal["json", "combined"] = "json"
    path: str = "stdout"


class Log(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    path: str = "stderr"


class Timeouts(Section):
    connect: Duration = 5.0
    upstream_read: Duration = 60.0
    client_header: Duration = 10.0
    client_body: Duration = 60.0
    keepalive: Duration = 75.0
    websocket_idle: Duration = 3600.0
    drain: Duration = 30.0


class RouteTimeouts(Section):
    connect: Duration | None = None
    upstream_read: Duration | None = None
    client_body: Duration | None = None
    websocket_idle: Duration | None = None


class Limits(Section):
    request_line: Size = 8192
    header_bytes: Size = 32768
    header_count: int = Field(100, ge=1)
    body: Size = 100 * 1024 * 1024
    requests_per_connection: int = Field(1000, ge=1)


class Http2(Section):
    """HTTP/2 towards clients (ALPN "h2" on TLS listeners, prior knowledge on cleartext ones) and its limits."""

    enabled: bool = Field(True, description="offer h2 in ALPN on TLS listeners")
    cleartext: bool = Field(True, description="accept h2c with prior knowledge on cleartext listeners")
    max_concurrent_streams: int = Field(128, ge=1, le=10000, description="streams a client may have open at once")
    max_header_list_size: Size = Field(65536, description="decoded request header list, as HPACK counts it")
    header_table_size: Size = Field(4096, description="HPACK dynamic table the client may use towards Bastion")
    initial_window_size: Size = Field(262144, description="flow-control window per stream for request bodies")
    max_frame_size: Size = Field(16384, description="largest frame a client may send (16 KiB - 16 MiB)")
    max_client_resets: int = Field(200, ge=1, description="streams a client may cancel per reset_window "
                                   "before the connection is closed (the rapid-reset attack)")
    reset_window: Duration = 10.0

    @field_validator("max_frame_size")
    @classmethod
    def _frame_size(cls, value: int) -> int:
        if not 16384 <= value <= 16777215:
            raise ValueError("max_frame_size is between 16 KiB and 16 MiB - 1")
        return value

    @field_validator("initial_window_size")
    @classmethod
    def _window(cls, value: int) -> int:
        if not 1 <= value <= 2**31 - 1:
            raise ValueError("initial_window_size is between 1 byte and 2 GiB - 1")
        return value


class RouteLimits(Section):
    body: Size | None = None


class Server(Section):
    address: str | None = Field(None, description="host:port; a DNS name is re-resolved as its TTL says")
    srv: str | None = Field(None, description="a DNS SRV name whose records give hosts, ports and weights")
    weight: int = Field(1, ge=1, le=1000)
    backup: bool = Field(False, description="only used when no primary server is available")
    drain: bool = Field(False, description="takes no new requests; in-flight ones finish")
    region: str | None = None
    zone: str | None = None

    @model_validator(mode="after")
    def _address_or_srv(self):
        if (self.address is None) == (self.srv is None):
            raise ValueError("give exactly one of address, srv")
        return self

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        if isinstance(value, str):
            return {"address": value}
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip()
        scheme = ""
        if text.startswith("http://"):
            text = text[len("http://") :].rstrip("/")
        elif text.startswith("https://"):
            scheme, text = "https://", text[len("https://") :].rstrip("/")
            if not re.search(r":\d+$", text):
                text += ":443"
        elif "://" in text:
            raise ValueError(f"{value!r}: upstream servers are http:// or https://")
        split_host_port(text, "127.0.0.1")
        return scheme + text

    @property
    def tls(self) -> bool:
        return bool(self.address and self.address.startswith("https://"))

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.address.removeprefix("https://"), "127.0.0.1")


class Keepalive(Section):
    max_idle: int = Field(64, ge=0, description="idle connections kept per peer; 0 disables reuse")
    idle_timeout: Duration = 60.0


class HashOn(Section):
    source: Literal["client_ip", "header", "cookie", "path"] = "client_ip"
    name: str | None = None

    @model_validator(mode="after")
    def _needs_name(self):
        if self.source in ("header", "cookie") and not self.name:
            raise ValueError(f"hashing on a {self.source} needs its name")
        return self


class ActiveCheck(Section):
    type: Literal["http", "tcp"] = "http"
    path: str = "/"
    method: Literal["GET", "HEAD", "OPTIONS"] = "GET"
    host: str | None = None
    expect_status: str = Field("200-399", description="a status, a range 'low-high', or a comma list of them")
    body_contains: str | None = None
    interval: Duration = 5.0
    timeout: Duration = 2.0
    rise: int = Field(2, ge=1)
    fall: int = Field(3, ge=1)

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, value: str) -> str:
        parse_status_set(value)
        return value


class PassiveCheck(Section):
    consecutive_failures: int = Field(5, ge=0, description="connect failures / resets in a row that eject; 0 = off")
    consecutive_5xx: int = Field(0, ge=0, description="5xx answers in a row that eject; 0 = off")
    error_rate_percent: int = Field(0, ge=0, le=100, description="eject when failures reach this share of a "
                                    "server's requests in error_rate_window; 0 = off")
    error_rate_window: Duration = 10.0
    error_rate_min_requests: int = Field(20, ge=1)
    base_ejection: Duration = 10.0
    max_ejection: Duration = 300.0
    max_ejected_percent: int = Field(50, ge=0, le=100)


class Health(Section):
    active: ActiveCheck | None = None
    passive: PassiveCheck = PassiveCheck()
    slow_start: Duration = 0.0


class Retries(Section):
    attempts: int = Field(2, ge=1, le=10, description="tries in total, each on a different server when possible")
    retry_on: list[Literal["connect_failure", "reset", "timeout", "502", "503", "504"]] = ["connect_failure", "reset"]
    idempotent_only: bool = True
    budget_percent: int = Field(20, ge=0, le=100, description="retries may add at most this share of requests")
    budget_min_per_second: int = Field(3, ge=0)
    per_try_timeout: Duration | None = Field(None, description="read timeout of each try (default: the route's upstream_read)")
    deadline: Duration | None = Field(None, description="no new try once this long has passed since the first")


class UpstreamLimits(Section):
    max_connections: int | None = Field(None, ge=1, description="open connections to the upstream's servers")
    max_pending: int | None = Field(None, ge=1, description="requests waiting for a new connection")
    max_requests: int | None = Field(None, ge=1, description="requests in flight")


class Sticky(Section):
    cookie: str = "bastion_sticky"
    secret: str | None = Field(None, description="HMAC key signing the cookie; default: one random key per master process")
    max_age: Duration | None = Field(None, description="cookie lifetime; default: a session cookie")


class UpstreamLocality(Section):
    """Nearest healthy servers first: the client's zone, then its region, then other regions."""

    enabled: bool = True
    spill_threshold: float = Field(0.7, gt=0, le=1, description="a level keeps all its traffic while this share of "
                                   "its servers is healthy, and sends the rest onwards in proportion below it")
    failover: dict[str, list[str]] = Field({}, description="per client region, the other regions in preference order")


class Upstream(Section):
    servers: list[Server] = []
    servers_from: str | None = Field(None, description="comma-separated host:port list (handy with ${ENV})")
    servers_file: str | None = Field(None, description="a file listing servers, re-read when it changes")

    @model_validator(mode="before")
    @classmethod
    def _servers_from(cls, value):
        if isinstance(value, dict) and value.get("servers_from"):
            extra = [s.strip() for s in str(value["servers_from"]).split(",") if s.strip()]
            value = {**value, "servers": list(value.get("servers") or []) + extra}
        return value
    balance: Literal["round_robin", "weighted", "least_conn", "least_time", "p2c", "hash", "cookie"] = "round_robin"
    hash_on: HashOn = HashOn()
    sticky: Sticky = Sticky()
    keepalive: Keepalive = Keepalive()
    health: Health = Health()
    retries: Retries = Retries()
    limits: UpstreamLimits = UpstreamLimits()
    locality: UpstreamLocality | None = None
    tls: UpstreamTls | None = Field(None, description="settings for https:// servers")
    protocol: Literal["http1", "h2"] = Field("http1", description="h2: HTTP/2 to the servers (gRPC); over TLS "
                                             "with ALPN for https:// servers, h2c prior knowledge for http://")

    @model_validator(mode="after")
    def _one_primary(self):
        if not self.servers and not self.servers_file:
            raise ValueError("give servers, servers_file, or both")
        if self.servers and not self.servers_file and all(s.backup for s in self.servers):
            raise ValueError("at least one server must not be a backup")
        return self


def parse_status_set(text: str) -> frozenset[int]:
    """'200', '200-399', '200,204,300-302' -> the set of statuses."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        try:
            a = int(low)
            b = int(high) if sep else a
        except ValueError:
            raise ValueError(f"{text!r} is not a status list such as '200-399' or '200,204'") from None
        if not (100 <= a <= b <= 599):
            raise ValueError(f"{part!r} is not a status range between 100 and 599")
        out.update(range(a, b + 1))
    return frozenset(out)


class PathMatch(Section):
    prefix: str | None = None
    exact: str | None = None
    regex: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        if isinstance(value, str):
            return {"prefix": value}
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("prefix", "exact", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prefix, exact, regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        elif not (self.prefix or self.exact or "").startswith("/"):
            raise ValueError("a path starts with '/'")
        return self


class HeaderMatch(Section):
    exact: str | None = None
    regex: str | None = None
    present: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        if isinstance(value, str):
            return {"present": True} if value == "*" else {"exact": value}
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("exact", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of exact, regex, present")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile: {exc}") from None
        return self


HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PURGE"}


class Match(Section):
    host: list[str] = []
    path: PathMatch | None = None
    methods: list[str] = []
    headers: dict[str, HeaderMatch] = {}

    @field_validator("host", mode="before")
    @classmethod
    def _host_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("host")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        out = []
        for host in value:
            host = host.strip().lower()
            if not host or "/" in host or " " in host:
                raise ValueError(f"{host!r} is not a host name")
            if "*" in host and not (host.startswith("*.") and "*" not in host[2:]):
                raise ValueError(f"{host!r}: a wildcard is only allowed as a leading '*.'")
            out.append(host)
        return out

    @field_validator("methods", mode="before")
    @classmethod
    def _method_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, value: list[str]) -> list[str]:
        out = [m.upper() for m in value]
        for m in out:
            if m not in HTTP_METHODS:
                raise ValueError(f"{m!r} is not an HTTP method Bastion routes ({', '.join(sorted(HTTP_METHODS))})")
        return out


class RegexRewrite(Section):
    pattern: str
    replacement: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"regex {value!r} does not compile: {exc}") from None
        return value


class Rewrite(Section):
    strip_prefix: str | None = None
    add_prefix: str | None = None
    regex: RegexRewrite | None = None


class HeaderOps(Section):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: list[str] = []


class Redirect(Section):
    to: str = Field(description="target URL; {scheme} {host} {path} {query} {request_uri} are replaced")
    status: Literal[301, 302, 303, 307, 308] = 301


class Respond(Section):
    status: int = Field(200, ge=200, le=599)
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = {}


class FilterRef(Section):
    use: str = Field(description="import path of a filter class, 'package.module:ClassName'")
    with_: dict = Field(default_factory=dict, alias="with")

    @field_validator("use")
    @classmethod
    def _import_path(cls, value: str) -> str:
        module, sep, name = value.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"{value!r} is not an import path; use 'package.module:ClassName'")
        return value


def _upstream_kind(value) -> str:
    return "upstream-name" if isinstance(value, str) else "upstream-inline"


# A route names an upstream or gives one inline; the discriminator keeps errors to the form used.
UpstreamRef = Annotated[
    Union[Annotated[str, Tag("upstream-name")], Annotated[Upstream, Tag("upstream-inline")]],
    Discriminator(_upstream_kind),
]


class Route(Section):
    name: str | None = None
    priority: int = 0
    match: Match = Match()
    upstream: UpstreamRef | None = None
    redirect: Redirect | None = None
    respond: Respond | None = None
    rewrite: Rewrite | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    upgrade: list[str] = ["websocket"]
    timeouts: RouteTimeouts = RouteTimeouts()
    limits: RouteLimits = RouteLimits()
    filters: list[FilterRef] = []

    @model_validator(mode="after")
    def _one_action(self):
        given = [k for k in ("upstream", "redirect", "respond") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a route needs exactly one of upstream, redirect, respond")
        return self


class ClientLocality(Section):
    """Where a client is, in this order: a header set by a trusted CDN or L4 balancer, a CIDR map, a
    MaxMind database; otherwise `default` (this node's own locality)."""

    header: str | None = Field(None, description="'region' or 'region/zone'; believed only from trusted_proxies")
    cidrs: dict[str, str] = Field({}, description="CIDR -> 'region' or 'region/zone'")
    maxmind_db: str | None = Field(None, description="a MaxMind-format database (read with maxminddb)")
    maxmind_regions: dict[str, str] = Field({}, description="country or continent code -> region")
    default: str | None = Field(None, description="'region' or 'region/zone' for clients not otherwise placed")

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, value: dict[str, str]) -> dict[str, str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR") from None
        return value


class Resolver(Section):
    address: str | None = Field(None, description="DNS server host:port; default: the system resolver")
    timeout: Duration = 2.0
    min_ttl: Duration = 1.0
    max_ttl: Duration = 300.0
    refresh: Duration = Field(30.0, description="re-resolution period when the system resolver gives no TTL")


class ProxySettings(Section):
    preserve_host: bool = Field(True, description="send the client's Host to the backend")
    x_forwarded: bool = True
    forwarded: bool = False
    request_id_header: str | None = "X-Request-ID"
    via: str | None = "bastion"
    hide_headers: list[str] = ["Server", "X-Powered-By", "X-AspNet-Version", "X-AspNetMvc-Version"]
    server_header: str | None = None


IPNetwork = Annotated[Union[ipaddress.IPv4Network, ipaddress.IPv6Network], Field()]


class Config(Section):
    workers: Union[int, Literal["auto"]] = "auto"
    pid_file: str | None = None
    listeners: list[Listener] = Field(min_length=1)
    admin: Admin | None = None
    access_log: AccessLog = AccessLog()
    log: Log = Log()
    trusted_proxies: list[IPNetwork] = []
    proxy: ProxySettings = ProxySettings()
    resolver: Resolver = Resolver()
    locality: ClientLocality = ClientLocality()
    acme: Acme | None = None
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    http2: Http2 = Http2()
    upstreams: dict[str, Upstream] = {}
    routes: list[Route] = Field(min_length=1)
    filters: list[FilterRef] = []

    @field_validator("workers")
    @classmethod
    def _workers(cls, value):
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("workers is 'auto' or a number from 1 to 256")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value):
        if isinstance(value, list):
            return [ipaddress.ip_network(str(v), strict=False) if isinstance(v, str) else v for v in value]
        return value
