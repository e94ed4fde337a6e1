"""A real test backend (aiohttp) that Bastion's tests proxy to. Run: python backend.py --port P [--name N]

/echo/... (and any unknown path)  JSON: name, method, path (with query), headers [[n, v], ...] in order,
                                   body_length, body_sha256, conn (the client port, to see reuse)
/status/{code}                    that status (no body for 204/304)
/delay/{seconds}                  sleeps, then 200 "ok"
/bytes/{n}                        n deterministic bytes (repeated 0123456789abcdef) with Content-Length
/chunked/{n}                      the same, chunked
/upload                           reads the body streaming, answers {length, sha256}
/headers?Name=value&...           answers 200 with those response headers
/redirect?to=URL[&status=302]     answers that redirect with Location: URL
/ws                               WebSocket echo (text and binary; subprotocol "chat" if asked for)
/close                            answers, then closes the connection
/__stats, /__reset                request count (not counting these two), reset
/__health                         200, or 503 after POST /__health/down (POST /__health/up to recover)
/cache/..., /__cache/...          responses with chosen caching headers, for the cache tests (cache_origin.py)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json

from aiohttp import WSMsgType, web

try:
    from cache_origin import add_routes as add_cache_routes  # run as a script (the tests do)
except ImportError:
    from tests.support.cache_origin import add_routes as add_cache_routes

PATTERN = b"0123456789abcdef" * 4096  # 64 KiB


def make_app(name: str) -> web.Application:
    state = {"requests": 0, "connections": set(), "healthy": True}

    @web.middleware
    async def count(request, handler):
        if request.path not in ("/__stats", "/__reset", "/__health", "/__health/up", "/__health/down"):
            state["requests"] += 1
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer:
                state["connections"].add(peer[1])
        return await handler(request)

    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        payload = {
            "name": name,
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_length": length,
            "body_sha256": digest.hexdigest(),
            "conn": peer[1] if peer else None,
        }
        return web.json_response(payload, headers={"X-Backend": name})

    async def status(request):
        code = int(request.match_info["code"])
        if code in (204, 304) or code < 200:
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}\n")

    async def delay(request):
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text="ok")

    async def stream_bytes(request, chunked: bool):
        n = int(request.match_info["n"])
        resp = web.StreamResponse()
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        sent = 0
        while sent < n:
            piece = PATTERN[: min(len(PATTERN), n - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def upload(request):
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            length += len(chunk)
        return web.json_response({"length": length, "sha256": digest.hexdigest()})

    async def headers(request):
        resp = web.Response(text="headers\n")
        for key, value in request.query.items():
            resp.headers[key] = value
        return resp

    async def redirect(request):
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]}, text="moved\n")

    async def ws(request):
        sock = web.WebSocketResponse(protocols=("chat",), max_msg_size=8 << 20)
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    async def close(request):
        resp = web.Response(text="closing\n", headers={"Connection": "close"})
        resp.force_close()
        return resp

    async def stats(request):
        return web.json_response({"requests": state["requests"], "connections": len(state["connections"])})

    async def health(request):
        if state["healthy"]:
            return web.Response(text=f"healthy {name}\n")
        return web.Response(status=503, text="unhealthy\n")

    async def set_health(request):
        state["healthy"] = request.match_info["state"] == "up"
        return web.Response(text="ok\n")

    async def reset(request):
        state["requests"] = 0
        state["connections"].clear()
        return web.json_response({"requests": 0})

    app = web.Application(middlewares=[count], client_max_size=1 << 40)
    app.router.add_get("/__stats", stats)
    app.router.add_get("/__health", health)
    app.router.add_post("/__health/{state}", set_health)
    app.router.add_route("*", "/__reset", reset)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/delay/{seconds}", delay)
    app.router.add_get("/bytes/{n}", lambda r: stream_bytes(r, False))
    app.router.add_get("/chunked/{n}", lambda r: stream_bytes(r, True))
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/headers", headers)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/ws", ws)
    app.router.add_get("/close", close)
    add_cache_routes(app)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cert", help="serve HTTPS with this PEM chain")
    parser.add_argument("--key")
    parser.add_argument("--client-ca", help="require client certificates from this CA")
    args = parser.parse_args()

    async def serve():
        runner = web.AppRunner(make_app(args.name), access_log=None)
        await runner.setup()
        context = None
        if args.cert:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(args.cert, args.key)
            if args.client_ca:
                context.load_verify_locations(args.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        site = web.TCPSite(runner, args.host, args.port, ssl_context=context)
        await site.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
