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


IPNetwork = Annotated[Union[ipaddress.IPv4Network, ipaddress.IPv6Network], Field()]


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


_ACME_NAME = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class Certificate(Section):
    cert: str | None = Field(None, description="PEM certificate chain file")
    key: str | None = Field(None, description="PEM private key file")
    acme: list[str] | None = Field(None, description="host names to get a certificate for over ACME")

    @field_validator("acme", mode="before")
    @classmethod
    def _names(cls, value):
        names = [value] if isinstance(value, str) else value
        if isinstance(names, list):
            for name in names:
                # the names become file names in acme.storage and are sent to the ACME server
                if isinstance(name, str) and not _ACME_NAME.fullmatch(name):
                    raise ValueError(f"{name!r} is not a host name")
        return names

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
    challenge: Literal["http-01", "tls-alpn-01"] = Field(
        "http-01", description="http-01: answered on port 80; tls-alpn-01: answered in the TLS handshake on 443")
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
    proxy_protocol: bool = Field(False, description="connections start with a PROXY protocol v1/v2 header "
                                 "(from a load balancer) that gives the client's address")

    @model_validator(mode="after")
    def _proxy_protocol_plain(self):
        if self.proxy_protocol and self.tls is not None:
            raise ValueError("proxy_protocol is supported on plain listeners only (put TLS behind the balancer "
                             "or terminate it there)")
        return self

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
    body_min_rate: Size = Field(0, description="bytes per second a request body must average once "
                                "body_min_rate_after has passed; 0 = off")
    body_min_rate_after: Duration = Field(5.0, description="grace period at the start of a body")


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
    request_line: Size | None = Field(None, description="tighter than the global limit for this route")
    header_bytes: Size | None = Field(None, description="tighter than the global limit for this route")
    header_count: int | None = Field(None, ge=1, description="tighter than the global limit for this route")
    body_min_rate: Size | None = None


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


# -- security (docs/security.md) ------------------------------------------------------------------------------



def _networks_before(value):
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        out = []
        for v in value:
            if isinstance(v, str):
                try:
                    out.append(ipaddress.ip_network(v.strip(), strict=False))
                except ValueError:
                    raise ValueError(f"{v!r} is not an IP address or CIDR") from None
            else:
                out.append(v)
        return out
    return value


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:r?/\s*(s|sec|second|m|min|minute|h|hour))?\s*$")
_RATE_PERIOD = {None: 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
                "h": 3600.0, "hour": 3600.0}


def parse_rate(value) -> tuple[float, float]:
    """100, '100/s', '6000/m', '10r/s' -> (count, period in seconds)."""
    if isinstance(value, bool):
        raise ValueError("a rate is a number per second or e.g. '100/s', '600/m', '1000/h'")
    if isinstance(value, (int, float)):
        count, period = float(value), 1.0
    else:
        match = _RATE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a rate; use e.g. 100, '100/s', '600/m', '1000/h'")
        count, period = float(match.group(1)), _RATE_PERIOD[match.group(2)]
    if count <= 0:
        raise ValueError("a rate must be above 0")
    return count, period


class AccessList(Section):
    """IP allow/deny lists: a denied address is refused; when `allow` is given, only those addresses get in."""

    allow: list[IPNetwork] = []
    deny: list[IPNetwork] = []

    @field_validator("allow", "deny", mode="before")
    @classmethod
    def _networks(cls, value):
        return _networks_before(value)


RATE_KEY_PARTS = ("client_ip", "route", "host", "path")


class RateLimit(Section):
    name: str | None = Field(None, description="names the limit in RateLimit-Policy and in Redis keys")
    key: list[str] = Field(["client_ip"], description="what is counted: client_ip, route, host, path, "
                           "header:NAME, cookie:NAME, or a list of them")
    rate: str | float = Field(description="requests per period: 100 (per second), '100/s', '600/m', '1000/h'")
    burst: int = Field(0, ge=0, description="requests allowed at once beyond the steady rate")
    delay: int | None = Field(None, ge=0, description="delay (instead of refusing) excess requests beyond "
                              "this many, up to burst; none = the burst passes at once")
    scope: Literal["node", "cluster"] = Field("node", description="cluster: one budget in Redis shared by nodes")
    status: int = Field(429, ge=400, le=599)
    headers: bool = Field(True, description="send RateLimit-Policy and RateLimit headers")

    @field_validator("key", mode="before")
    @classmethod
    def _key_list(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("key")
    @classmethod
    def _key_parts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a rate limit key needs at least one part")
        for part in value:
            kind, sep, name = part.partition(":")
            if sep:
                if kind not in ("header", "cookie") or not name.strip():
                    raise ValueError(f"{part!r}: use header:NAME or cookie:NAME")
            elif part not in RATE_KEY_PARTS:
                raise ValueError(f"{part!r} is not a key part; use {', '.join(RATE_KEY_PARTS)}, header:NAME, cookie:NAME")
        return value

    @field_validator("rate")
    @classmethod
    def _rate(cls, value):
        parse_rate(value)
        return value

    @model_validator(mode="after")
    def _delay_in_burst(self):
        if self.delay is not None and self.delay > self.burst:
            raise ValueError("delay cannot be larger than burst")
        return self

    @property
    def per_second(self) -> float:
        count, period = parse_rate(self.rate)
        return count / period


class ConnectionLimits(Section):
    max_per_ip: int | None = Field(None, ge=1, description="open connections per client address, node-wide")
    max_total: int | None = Field(None, ge=1, description="open client connections, node-wide")


class AutoBan(Section):
    window: Duration = Field(60.0, description="events are counted over this period")
    ban_time: Duration = Field(600.0, description="how long a ban lasts")
    max_4xx: int | None = Field(100, ge=1, description="4xx answers in a window that ban; none = not counted")
    max_waf_blocks: int | None = Field(5, ge=1, description="WAF blocks (error waf_blocked) that ban")
    max_rate_limited: int | None = Field(50, ge=1, description="rate-limit refusals (error rate_limited) that ban")
    status: int = Field(403, ge=400, le=599)


class SecurityHeaders(Section):
    content_type_options: bool = Field(True, description="X-Content-Type-Options: nosniff")
    frame_options: str | None = Field("DENY", description="X-Frame-Options; none = not sent")
    referrer_policy: str | None = "strict-origin-when-cross-origin"
    content_security_policy: str | None = None
    override: bool = Field(False, description="replace the backend's own values (default: keep them)")


class HideBackends(Section):
    rewrite_location: bool = Field(True, description="Location/Content-Location naming a backend address "
                                   "are rewritten to the public host")
    public_host: str | None = Field(None, description="host[:port] to rewrite to; default: the request's Host")
    public_scheme: Literal["http", "https"] | None = Field(None, description="default: the listener's scheme")


class RedisSettings(Section):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "bastion:"
    timeout: Duration = Field(0.25, description="per command; slower is treated as unreachable")
    on_error: Literal["local", "open", "closed"] = Field("local", description="when Redis is unreachable: "
                                                          "local limits, let everything through, or refuse (503)")
    retry_interval: Duration = Field(5.0, description="how long to stay on the fallback before trying again")


class Security(Section):
    access: AccessList = AccessList()
    connections: ConnectionLimits = ConnectionLimits()
    rate_limits: list[RateLimit] = []
    auto_ban: AutoBan | None = None
    headers: SecurityHeaders | None = None
    hide_backends: HideBackends = HideBackends()
    redis: RedisSettings | None = None
    client_ip_header: str = Field("X-Forwarded-For", description="where the client address is read from "
                                  "when the peer is in trusted_proxies")
    table_slots: int = Field(65536, ge=1024, le=1 << 22, description="node-wide shared-memory slots for "
                             "rate-limit keys, bans and counters")


class RouteSecurity(Section):
    access: AccessList | None = None
    rate_limits: list[RateLimit] = []
    skip_global_rate_limits: bool = False
    max_concurrent: int | None = Field(None, ge=1, description="requests in flight on this route, node-wide")
    headers: SecurityHeaders | None = None


# -- WAF (docs/security.md#waf) -------------------------------------------------------------------------------

class WafExclusion(Section):
    """Rules switched off: everywhere, or only for requests whose path starts with `path`."""

    rule_ids: list[int | str] = Field([], description="rule ids, or ranges such as '942100-942199'")
    tags: list[str] = Field([], description="rule tags, e.g. 'attack-sqli' or 'paranoia-level/2'")
    path: str | None = Field(None, description="only for request paths starting with this prefix")

    @field_validator("rule_ids")
    @classmethod
    def _ids(cls, value: list) -> list:
        for item in value:
            text = str(item).strip()
            low, sep, high = text.partition("-")
            if not low.isdigit() or (sep and (not high.isdigit() or int(high) < int(low))):
                raise ValueError(f"{item!r} is not a rule id or an id range such as '942100-942199'")
        return value

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not tag or '"' in tag or "'" in tag or "," in tag or any(c.isspace() for c in tag):
                raise ValueError(f"{tag!r} is not a rule tag")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or '"' in value or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r}: a path prefix starts with '/' and has no spaces or quotes")
        return value

    @model_validator(mode="after")
    def _something(self):
        if not self.rule_ids and not self.tags:
            raise ValueError("an exclusion needs rule_ids or tags")
        return self


def _waf_body_limit(value: int) -> int:
    if value > 64 * 1024 * 1024:
        raise ValueError("body_limit is at most 64MiB (bodies are held in memory for inspection)")
    return value


class WafRouteSettings(Section):
    """What a route may change of the global WAF settings (unset fields inherit them)."""

    enabled: bool | None = Field(None, description="false: no WAF on this route; true: WAF even without a global one")
    mode: Literal["off", "detect", "block"] | None = None
    paranoia_level: int | None = Field(None, ge=1, le=4)
    inbound_anomaly_threshold: int | None = Field(None, ge=1)
    exclusions: list[WafExclusion] = Field([], description="added to the global exclusions")
    body_limit: Size | None = None
    on_body_limit: Literal["pass", "reject"] | None = None

    @field_validator("body_limit")
    @classmethod
    def _body_limit(cls, value: int | None) -> int | None:
        return value if value is None else _waf_body_limit(value)

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value):
        if isinstance(value, bool):
            return {"enabled": value}
        return value


class Waf(Section):
    """The web application firewall: OWASP CRS run by libmodsecurity3 (docs/security.md)."""

    enabled: bool = Field(True, description="false: the WAF only runs on routes that enable it")
    mode: Literal["off", "detect", "block"] = Field("block", description="detect: log matches only")
    paranoia_level: int = Field(1, ge=1, le=4)
    inbound_anomaly_threshold: int = Field(5, ge=1, description="CRS anomaly score that blocks a request")
    outbound_anomaly_threshold: int = Field(4, ge=1)
    exclusions: list[WafExclusion] = []
    body_limit: Size = Field(128 * 1024, description="request bodies up to this size are inspected")
    on_body_limit: Literal["pass", "reject"] = Field("reject", description="larger bodies: 413, or pass uninspected")
    audit_log: str | None = Field("stdout", description="JSON line per request that matched a rule: a file, "
                                  "stdout, stderr; null: none")
    threads: int = Field(2, ge=1, le=64, description="inspection threads per worker (the event loop never waits)")
    max_pending: int = Field(1024, ge=1, description="inspections queued per worker before answering 503")
    crs_setup: str = "/etc/modsecurity/crs/crs-setup.conf"
    crs_rules: str = Field("/usr/share/modsecurity-crs/rules", description="directory of the CRS rule files")
    extra_rules: list[str] = Field([], description="more ModSecurity rule files, loaded after CRS")

    @field_validator("body_limit")
    @classmethod
    def _body_limit(cls, value: int) -> int:
        return _waf_body_limit(value)
class CacheKey(Section):
    """What makes two requests the same cached object."""

    scheme: bool = True
    host: bool = Field(True, description="the Host header as sent (lower-cased, with its port)")
    query: Literal["all", "none", "sorted"] = Field("all", description="keep the query as sent, drop it, or "
                                                    "sort its parameters")
    query_ignore: list[str] = Field([], description="query parameters left out of the key (e.g. utm_source)")
    query_keep: list[str] | None = Field(None, description="only these query parameters count")
    sort_query: bool = False
    headers: list[str] = Field([], description="request headers whose values are part of the key")
    cookies: list[str] = Field([], description="cookies whose values are part of the key")


class RouteCache(Section):
    enabled: bool = True
    store: Literal["memory", "disk", "redis"] = Field("memory", description="disk: shared by the node's workers, "
                                                      "kept across restarts; redis: shared by every node (both with "
                                                      "the memory store as a first level)")
    key: CacheKey = CacheKey()
    default_ttl: Duration | None = Field(None, description="freshness for responses that give none (RFC 9111 "
                                         "gives them none: off by default)")
    max_ttl: Duration | None = Field(None, description="cap on any response's freshness")
    heuristic_fraction: float = Field(0.1, ge=0, le=1, description="heuristic freshness as a share of the time "
                                      "since Last-Modified")
    heuristic_max: Duration = 86400.0
    methods: list[Literal["GET", "HEAD"]] = ["GET", "HEAD"]
    statuses: str | None = Field(None, description="statuses that may be stored; default: every final status "
                                 "but 206 (those without explicit freshness only if heuristically cacheable)")
    max_object_size: Size = 8 << 20
    store_set_cookie: bool = Field(False, description="store responses with Set-Cookie (stored without it)")
    stale_while_revalidate: Duration = Field(0.0, description="default for responses that do not say")
    stale_if_error: Duration = Field(0.0, description="default for responses that do not say")
    grace: Duration = Field(0.0, description="serve stale up to this long past expiry when no backend answers")
    collapse: bool = True
    collapse_timeout: Duration = 5.0
    purge_from: list[IPNetwork] = Field([], description="addresses allowed to send PURGE")

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, value):
        if value is not None:
            parse_status_set(value)
        return value

    @field_validator("purge_from", mode="before")
    @classmethod
    def _networks(cls, value):
        if isinstance(value, list):
            return [ipaddress.ip_network(str(v), strict=False) if isinstance(v, str) else v for v in value]
        return value


class CacheRedis(Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL")
    prefix: str = "bastion:cache:"
    timeout: Duration = Field(0.25, description="a lookup slower than this is a miss")


class CacheDisk(Section):
    path: str = Field(description="a folder for the node's cached responses (created if missing)")
    size: Size = Field(1 << 30, description="bytes of responses kept on disk")


class CacheSettings(Section):
    memory_size: Size = Field(256 << 20, description="bytes of responses each worker keeps in memory")
    redis: CacheRedis | None = Field(None, description="the shared store for routes with store: redis")
    disk: CacheDisk | None = Field(None, description="the node's store for routes with store: disk")
    name: str = Field("Bastion", description="the cache's name in Cache-Status")


def _upstream_kind(value) -> str:
    return "upstream-name" if isinstance(value, str) else "upstream-inline"


# A route names an upstream or gives one inline; the discriminator keeps errors to the form used.
UpstreamRef = Annotated[
    Union[Annotated[str, Tag("upstream-name")], Annotated[Upstream, Tag("upstream-inline")]],
    Discriminator(_upstream_kind),
]


class Route(Section):
    @model_validator(mode="before")
    @classmethod
    def _cache_shorthand(cls, value):
        if isinstance(value, dict) and isinstance(value.get("cache"), bool):
            value = {**value, "cache": {"enabled": value["cache"]}}
        return value

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
    cache: RouteCache | None = None
    timeouts: RouteTimeouts = RouteTimeouts()
    limits: RouteLimits = RouteLimits()
    security: RouteSecurity = RouteSecurity()
    filters: list[FilterRef] = []
    waf: WafRouteSettings | None = None

    @model_validator(mode="after")
    def _one_action(self):
        if self.cache is not None and self.upstream is None and self.cache.enabled:
            raise ValueError("cache: needs a route with an upstream")
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
    security: Security = Security()
    cache: CacheSettings = CacheSettings()
    http2: Http2 = Http2()
    upstreams: dict[str, Upstream] = {}
    routes: list[Route] = Field(min_length=1)
    filters: list[FilterRef] = []
    waf: Waf | None = None

    @model_validator(mode="after")
    def _security_consistent(self):
        names = [r.name for r in self.security.rate_limits if r.name]
        if len(names) != len(set(names)):
            raise ValueError("security.rate_limits: names must be unique")
        wants_redis = any(r.scope == "cluster" for r in self.security.rate_limits) or any(
            r.scope == "cluster" for route in self.routes for r in route.security.rate_limits)
        if wants_redis and self.security.redis is None:
            raise ValueError("rate limits with scope: cluster need security.redis")
        for index, route in enumerate(self.routes):
            lim = route.limits
            for field in ("request_line", "header_bytes", "header_count"):
                value = getattr(lim, field)
                if value is not None and value > getattr(self.limits, field):
                    raise ValueError(f"routes[{index}].limits.{field} ({value}) can only be tighter than the "
                                     f"global limits.{field} ({getattr(self.limits, field)}), which bounds parsing")
        return self

    @model_validator(mode="after")
    def _cache_stores(self):
        for index, route in enumerate(self.routes):
            if route.cache is not None and route.cache.store == "redis" and self.cache.redis is None:
                raise ValueError(f"routes[{index}].cache.store is redis: give cache.redis (url, prefix)")
            if route.cache is not None and route.cache.store == "disk" and self.cache.disk is None:
                raise ValueError(f"routes[{index}].cache.store is disk: give cache.disk (path, size)")
        return self

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
