"""RFC 9111 (HTTP caching) for a shared cache, as pure functions: no I/O, no clock of their own (the caller
passes `now`), no knowledge of Bastion's request objects. The cache filter feeds them header values and
acts on their answers; tests/unit/test_cache_policy.py checks them against the RFC's rules.

Times are wall-clock seconds (floats), as HTTP dates are.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Iterable

# Statuses a cache may give heuristic freshness to (RFC 9110 15.1: "heuristically cacheable").
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Statuses this cache understands well enough to store (with explicit freshness for the others).
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 303, 307}
# RFC 9111 3 lets a cache store any final status with explicit freshness (heuristic freshness only for
# the heuristic set above); partial responses are not combined, and a 304 is never stored itself.
DEFAULT_STATUSES = frozenset(range(200, 600)) - {206, 304}

UNSAFE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
MAX_DELTA = 2**31  # RFC 9111 1.2.2: larger delta-seconds are treated as this

# Fields a cache never stores (RFC 9111 3.1: hop-by-hop and connection-specific) plus the ones Bastion
# computes itself when it answers from the cache (Age, Content-Length, Cache-Status).
NOT_STORED = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection",
    "proxy-authenticate", "proxy-authentication-info", "proxy-authorization", "age", "content-length",
    "cache-status",
})
# Fields a 304 must not change in the stored response (RFC 9111 3.2).
NOT_UPDATED = NOT_STORED | {"content-range"}
# Fields sent with a 304 answered from the cache (RFC 9110 15.4.5), besides Age.
NOT_MODIFIED_FIELDS = frozenset({
    "cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified",
    "surrogate-key", "cache-tag",
})


# -- parsing ------------------------------------------------------------------------------------------------

def parse_cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Cache-Control field values -> {directive: argument or None}. Names are case-insensitive; quoted
    arguments are unquoted; a repeated directive keeps its first argument, and a conflicting repeat of a
    freshness directive is recorded as "conflict" (the response is then treated as stale)."""
    out: dict[str, str | None] = {}
    for value in values:
        for part in _split_commas(value):
            name, eq, arg = part.partition("=")
            name = name.strip().lower()
            if not name:
                continue
            argument: str | None = None
            if eq:
                arg = arg.strip()
                if len(arg) >= 2 and arg[0] == '"' and arg[-1] == '"':
                    arg = arg[1:-1].replace('\\"', '"')
                argument = arg
            if name in out:
                if name in ("max-age", "s-maxage") and out[name] != argument:
                    out[name] = "conflict"
                continue
            out[name] = argument
    return out


def _split_commas(value: str) -> list[str]:
    """Split on commas outside quoted strings."""
    parts, current, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            current.append(ch)
            escaped = True
        elif ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == "," and not quoted:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def delta_seconds(argument: str | None) -> int | None:
    """A delta-seconds argument, or None when it is missing or not a non-negative integer."""
    if argument is None:
        return None
    argument = argument.strip()
    if not argument.isdigit():
        return None
    return min(int(argument), MAX_DELTA)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date (IMF-fixdate, RFC 850 or asctime) -> epoch seconds; None if missing or invalid."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        from datetime import timezone

        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def format_http_date(epoch: float) -> str:
    from email.utils import formatdate

    return formatdate(epoch, usegmt=True)


def parse_age(value: str | None) -> int:
    """The Age field; an invalid one counts as 0 (RFC 9111 5.1 lets a cache ignore it)."""
    if value is None:
        return 0
    value = value.split(",")[0].strip()
    return min(int(value), MAX_DELTA) if value.isdigit() else 0


def split_list(value: str | None) -> list[str]:
    if not value:
        return []
    return [v.strip() for v in _split_commas(value) if v.strip()]


# -- storing (RFC 9111 3) -------------------------------------------------------------------------------------

def storable(method: str, status: int, request_cc: dict, response_cc: dict, *, has_authorization: bool,
             has_set_cookie: bool, has_expires: bool, has_validator: bool, vary: list[str],
             statuses: frozenset = DEFAULT_STATUSES, store_set_cookie: bool = False,
             has_default_ttl: bool = False) -> str | None:
    """None when the response may be stored, else why not (a short reason for logs and Cache-Status)."""
    if method != "GET":
        return "method"
    if status not in statuses:
        return "status"
    if "must-understand" in response_cc:
        if status not in UNDERSTOOD_STATUSES:
            return "status"
    elif "no-store" in response_cc:
        return "no-store"
    if "no-store" in request_cc:
        return "request-no-store"
    if "private" in response_cc and response_cc["private"] is None:
        return "private"  # a qualified private only keeps the listed fields out (see fields_not_stored)
    if has_authorization and not ("public" in response_cc or "s-maxage" in response_cc
                                  or "must-revalidate" in response_cc):
        return "authorization"
    if any(v == "*" for v in vary):
        return "vary-star"
    if has_set_cookie and not store_set_cookie:
        return "set-cookie"
    explicit = ("public" in response_cc or "max-age" in response_cc or "s-maxage" in response_cc or has_expires
                or unqualified(response_cc, "no-cache"))
    if not explicit and status not in HEURISTIC_STATUSES and not has_default_ttl:
        return "no-freshness"
    if not explicit and not has_validator and not has_default_ttl and status in HEURISTIC_STATUSES:
        # Stored, it would be stale at once and could not be revalidated: not worth a slot.
        return "no-freshness"
    return None


def freshness_lifetime(response_cc: dict, *, date: float | None, expires: str | None, has_expires: bool,
                       last_modified: float | None, status: int, response_time: float,
                       heuristic_fraction: float = 0.1, heuristic_max: float = 86400.0,
                       default_ttl: float | None = None, max_ttl: float | None = None) -> float:
    """Seconds the response is fresh for, for a shared cache (RFC 9111 4.2.1, 4.2.2)."""
    lifetime: float | None = None
    for directive in ("s-maxage", "max-age"):
        if directive in response_cc:
            argument = response_cc[directive]
            value = delta_seconds(argument)
            lifetime = float(value) if value is not None else 0.0  # invalid or conflicting: stale
            break
    if lifetime is None and has_expires:
        expires_at = parse_http_date(expires)
        if expires_at is None:
            lifetime = 0.0  # an invalid Expires (e.g. "0") means already expired
        else:
            lifetime = max(0.0, expires_at - (date if date is not None else response_time))
    if lifetime is None:
        if default_ttl is not None:
            lifetime = default_ttl
        elif last_modified is not None and (status in HEURISTIC_STATUSES or "public" in response_cc):
            base = date if date is not None else response_time
            lifetime = min(heuristic_max, max(0.0, (base - last_modified) * heuristic_fraction))
        else:
            lifetime = 0.0
    if max_ttl is not None:
        lifetime = min(lifetime, max_ttl)
    return lifetime


def unqualified(cc: dict, directive: str) -> bool:
    """The directive is present without a field-name list (`no-cache`, not `no-cache="Set-Cookie"`)."""
    return directive in cc and cc[directive] is None


def fields_not_stored(response_cc: dict, connection: list[str]) -> frozenset[str]:
    """Fields a shared cache must leave out of the stored response: those named by a qualified no-cache
    or private (RFC 9111 5.2.2.4, 5.2.2.7) and by Connection (RFC 9110 7.6.1)."""
    names = set()
    for directive in ("no-cache", "private"):
        value = response_cc.get(directive)
        if value:
            names.update(n.strip().lower() for n in value.split(",") if n.strip())
    for value in connection:
        names.update(n.strip().lower() for n in value.split(",") if n.strip())
    return frozenset(names)


def is_heuristic(response_cc: dict, has_expires: bool) -> bool:
    return not ("s-maxage" in response_cc or "max-age" in response_cc or has_expires)


def corrected_initial_age(*, age_value: int, date: float | None, request_time: float,
                          response_time: float) -> float:
    """RFC 9111 4.2.3: the age of the response when it arrived."""
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(initial_age: float, response_time: float, now: float) -> float:
    return initial_age + max(0.0, now - response_time)


# -- using a stored response (RFC 9111 4) ---------------------------------------------------------------------

FRESH = "fresh"  # serve it
STALE_OK = "stale-ok"  # serve it stale (the client allows it with max-stale)
REVALIDATE = "revalidate"  # ask the origin (conditional request) before using it


def request_no_cache(request_cc: dict, pragma: str | None) -> bool:
    """The request's no-cache (or Pragma: no-cache when there is no Cache-Control, RFC 9111 5.4)."""
    if "no-cache" in request_cc:
        return True
    return not request_cc and pragma is not None and "no-cache" in pragma.lower()


def revalidation_required(response_cc: dict) -> bool:
    """must-revalidate, proxy-revalidate and s-maxage forbid serving this response stale (shared cache)."""
    return "must-revalidate" in response_cc or "proxy-revalidate" in response_cc or "s-maxage" in response_cc


def use_decision(*, lifetime: float, age: float, response_cc: dict, request_cc: dict,
                 request_no_cache: bool) -> str:
    """Whether a stored response may answer this request as is, stale, or only after revalidation."""
    if unqualified(response_cc, "no-cache") or request_no_cache:
        return REVALIDATE
    max_age = delta_seconds(request_cc.get("max-age")) if "max-age" in request_cc else None
    if "max-age" in request_cc and max_age is None:
        max_age = 0  # an invalid request max-age: be safe
    if max_age is not None and age > max_age:
        return REVALIDATE
    remaining = lifetime - age
    if "min-fresh" in request_cc:
        min_fresh = delta_seconds(request_cc.get("min-fresh")) or 0
        if remaining < min_fresh:
            return REVALIDATE
    if remaining > 0:
        return FRESH
    if "max-stale" in request_cc and not revalidation_required(response_cc):
        allowed = request_cc.get("max-stale")
        if allowed is None:
            return STALE_OK
        seconds = delta_seconds(allowed)
        if seconds is not None and -remaining <= seconds:
            return STALE_OK
    return REVALIDATE


def stale_window(response_cc: dict, directive: str, configured: float = 0.0) -> float:
    """Seconds past expiry a stale response may be used for `directive` ("stale-while-revalidate" or
    "stale-if-error", RFC 5861): the response's own value, else the route's configured one (which
    must-revalidate and friends switch off)."""
    if directive in response_cc:
        value = delta_seconds(response_cc[directive])
        return float(value) if value is not None else 0.0
    if revalidation_required(response_cc) or unqualified(response_cc, "no-cache"):
        return 0.0
    return configured


# -- conditional requests answered from the cache (RFC 9110 13) ------------------------------------------------

def etag_matches_weak(if_none_match: str, etag: str | None) -> bool:
    """If-None-Match uses the weak comparison."""
    if etag is None:
        return False
    value = if_none_match.strip()
    if value == "*":
        return True
    target = etag[2:] if etag.startswith("W/") else etag
    for candidate in split_list(value):
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == target:
            return True
    return False


def not_modified(*, if_none_match: str | None, if_modified_since: str | None, etag: str | None,
                 last_modified: float | None, date: float | None) -> bool:
    """Would the origin answer 304 to this conditional GET/HEAD, judged from the stored response?"""
    if if_none_match is not None:
        return etag_matches_weak(if_none_match, etag)
    if if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        reference = last_modified if last_modified is not None else date
        return since is not None and reference is not None and reference <= since
    return False


def if_range_matches(if_range: str | None, etag: str | None, last_modified: float | None) -> bool:
    """If-Range: the range applies only if the validator is a strong match (RFC 9110 13.1.5)."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        return etag is not None and not etag.startswith("W/") and value == etag
    date = parse_http_date(value)
    return date is not None and last_modified is not None and date == last_modified


def byte_range(range_header: str, length: int) -> tuple[int, int] | None | str:
    """A single `bytes=` range -> (first, last) inclusive; "unsatisfiable"; or None to ignore the header
    (not bytes, several ranges, malformed: the full response is sent instead, as RFC 9110 allows)."""
    unit, eq, spec = range_header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if len(specs) != 1:
        return None
    first_text, dash, last_text = specs[0].partition("-")
    first_text, last_text = first_text.strip(), last_text.strip()
    if not dash:
        return None
    if not first_text:
        if not last_text.isdigit():
            return None
        suffix = int(last_text)
        if suffix == 0 or length == 0:
            return "unsatisfiable"
        return max(0, length - suffix), length - 1
    if not first_text.isdigit() or (last_text and not last_text.isdigit()):
        return None
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None
    if first >= length:
        return "unsatisfiable"
    last = int(last_text) if last_text else length - 1
    return first, min(last, length - 1)


# -- Vary (RFC 9111 4.1) -----------------------------------------------------------------------------------------

def normalize_accept_encoding(value: str) -> str:
    """Accept-Encoding in a canonical form so that equivalent headers share one variant: codings
    lower-cased and sorted, q=0 ones dropped, q-values and spaces removed."""
    codings = set()
    for part in value.split(","):
        name, _, params = part.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val.strip())
                except ValueError:
                    q = 1.0
        if q > 0:
            codings.add(name)
    return ",".join(sorted(codings))


def normalize_vary_value(name: str, values: list[str]) -> str:
    """The request's value(s) of one Vary-listed field, normalised (RFC 9111 4.1 allows it)."""
    if not values:
        return "\x00"  # absent differs from empty
    if name == "accept-encoding":
        return normalize_accept_encoding(",".join(values))
    # As a list: field lines combined, spaces around the commas and at the ends dropped.
    return ",".join(" ".join(part.split()) for value in values for part in value.split(","))


def vary_names(values: Iterable[str]) -> list[str]:
    names: list[str] = []
    for value in values:
        for name in split_list(value):
            name = name.lower()
            if name not in names:
                names.append(name)
    return names


# -- invalidation (RFC 9111 4.4) ---------------------------------------------------------------------------------

def invalidation_targets(scheme: str, host: str, location: str | None, content_location: str | None) -> list[str]:
    """Same-origin targets of Location and Content-Location as "path?query" (the request URI itself is
    always invalidated by the caller)."""
    out = []
    for value in (location, content_location):
        if not value:
            continue
        value = value.strip()
        if value.startswith("//"):
            value = scheme + ":" + value
        lower = value.lower()
        if lower.startswith("http://") or lower.startswith("https://"):
            target_scheme, _, rest = value.partition("://")
            authority, slash, path = rest.partition("/")
            if target_scheme.lower() != scheme or authority.lower() != host.lower():
                continue  # another origin: not ours to invalidate
            value = "/" + path
        elif not value.startswith("/"):
            continue  # relative paths other than absolute-path are rare; not resolved
        out.append(value.split("#", 1)[0])
    return out


def response_is_error(status: int) -> bool:
    return status >= 500
