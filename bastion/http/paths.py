"""Request-path normalisation (RFC 3986 5.2.4), so that routes match what the backend will resolve."""

from __future__ import annotations


def normalize_path(path: bytes) -> bytes:
    """Remove '.' and '..' segments; '..' never climbs above the root."""
    segments = path.split(b"/")
    out: list[bytes] = []
    for segment in segments[1:]:
        if segment == b".":
            continue
        if segment == b"..":
            if out:
                out.pop()
            continue
        out.append(segment)
    normalized = b"/" + b"/".join(out)
    if segments[-1] in (b".", b"..") and not normalized.endswith(b"/"):
        normalized += b"/"
    return normalized
