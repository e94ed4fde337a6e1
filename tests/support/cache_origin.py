"""Endpoints of the test backend for the cache tests: responses whose caching headers the test chooses,
a hit count per path, conditional requests honoured, and a switch that makes the origin fail.

GET /cache/<anything>?cc=...&etag=...&lm=<seconds ago>&expires=<seconds from now>|<raw>&vary=...&status=...
    &delay=<seconds>&age=...&date=<seconds offset>&h-Name=value (any extra response header)&body=...
    &l-Name=value (a header set from the path's second request on, e.g. on a 304)
    Answers `body` (default "<path> #<n>", n = this path's hit count), 304 to a matching If-None-Match /
    If-Modified-Since (when etag= / lm= are given), Location/Content-Location via h-.
GET /__cache/hits            {path: count} of /cache/ requests (conditional ones included)
GET /__cache/requests?path=  the request headers of each request to that path, in order
POST /__cache/fail?status=N  every /cache/ request answers N from now on (0: back to normal);
                             status=-1 closes the connection without an answer
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

from aiohttp import web


def add_routes(app: web.Application) -> None:
    state = {"hits": {}, "requests": {}, "fail": 0}

    async def cached(request: web.Request):
        path = request.path
        n = state["hits"][path] = state["hits"].get(path, 0) + 1
        state["requests"].setdefault(path, []).append(
            [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers])
        q = request.query
        if "delay" in q:
            await asyncio.sleep(float(q["delay"]))
        fail = state["fail"]
        if fail == -1:
            request.transport.close()
            await asyncio.sleep(0.1)
            raise web.HTTPInternalServerError()
        if fail:
            return web.Response(status=fail, text=f"failing {fail}\n")
        headers = {}
        now = time.time()
        if "cc" in q:
            headers["Cache-Control"] = q["cc"]
        if "etag" in q:
            headers["ETag"] = q["etag"]
        if "lm" in q:
            # Fixed at the path's first request, so that later requests see the same Last-Modified.
            modified = state.setdefault("lm", {}).setdefault(path, int(now - float(q["lm"])))
            headers["Last-Modified"] = formatdate(modified, usegmt=True)
        if "expires" in q:
            value = q["expires"]
            try:
                headers["Expires"] = formatdate(now + float(value), usegmt=True)
            except ValueError:
                headers["Expires"] = value
        if "vary" in q:
            headers["Vary"] = q["vary"]
        if "age" in q:
            headers["Age"] = q["age"]
        headers["Date"] = formatdate(now + float(q.get("date", 0)), usegmt=True)
        for key, value in q.items():
            if key.startswith("h-"):
                headers[key[2:]] = value
        for key, value in q.items():
            if key.startswith("l-") and n >= 2:  # later: from this path's second request on
                headers[key[2:]] = value
        status = int(q.get("status", 200))
        inm = request.headers.get("If-None-Match")
        ims = request.headers.get("If-Modified-Since")
        if status == 200 and "etag" in q and inm is not None:
            if q["etag"] in [t.strip() for t in inm.split(",")] or inm.strip() == "*":
                return web.Response(status=304, headers=headers)
        elif status == 200 and "lm" in q and ims is not None and inm is None:
            from email.utils import parsedate_to_datetime

            if parsedate_to_datetime(ims).timestamp() >= state["lm"][path]:
                return web.Response(status=304, headers=headers)
        body = q.get("body", f"{path} #{n}")
        if "size" in q:
            body = ("x" * int(q["size"]))
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, text=body, headers=headers)

    async def hits(request):
        return web.json_response(state["hits"])

    async def requests(request):
        return web.json_response(state["requests"].get(request.query.get("path", ""), []))

    async def fail(request):
        state["fail"] = int(request.query.get("status", "0"))
        return web.json_response({"fail": state["fail"]})

    async def any_method(request):
        # Unsafe methods to /cache/ paths answer as the test says (status, Location), counted too.
        path = request.path
        state["hits"][path] = state["hits"].get(path, 0) + 1
        status = int(request.query.get("status", 200))
        headers = {k[2:]: v for k, v in request.query.items() if k.startswith("h-")}
        await request.read()
        return web.Response(status=status, text=f"{request.method} done\n", headers=headers)

    app.router.add_get("/__cache/hits", hits)
    app.router.add_get("/__cache/requests", requests)
    app.router.add_post("/__cache/fail", fail)
    app.router.add_get("/cache/{tail:.*}", cached)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        app.router.add_route(method, "/cache/{tail:.*}", any_method)
