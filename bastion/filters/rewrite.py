"""Path rewrites towards the backend: strip a prefix, replace by regex, add a prefix (in that order)."""

from __future__ import annotations

import re


class PathRewrite:
    def __init__(self, strip_prefix: str | None = None, add_prefix: str | None = None,
                 regex: str | None = None, replacement: str = ""):
        self.strip = strip_prefix.rstrip("/").encode() if strip_prefix else None
        self.add = add_prefix.rstrip("/").encode() if add_prefix else None
        self.pattern = re.compile(regex.encode()) if regex else None
        # Python's \1 and nginx-style $1 both mean the first group.
        self.replacement = re.sub(r"\$(\d+)", r"\\\1", replacement).encode()

    def upstream_request_filter(self, ex) -> None:
        path = ex.path
        strip = self.strip
        if strip and (path == strip or path.startswith(strip + b"/")):
            path = path[len(strip):] or b"/"
        if self.pattern is not None:
            path = self.pattern.sub(self.replacement, path, count=1)
            if not path.startswith(b"/"):
                path = b"/" + path
        if self.add:
            path = self.add + path
        ex.upstream_path = path + b"?" + ex.query if ex.query else path
