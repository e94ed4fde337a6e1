"""Bastion's own error pages: small, plain, HTML or JSON by Accept, always carrying the request id."""

from __future__ import annotations

import json

from bastion.http.headers import reason_phrase
from bastion.proxy.exchange import Response

_HTML = (
    "<!DOCTYPE html>\n<html><head><title>{code} {reason}</title></head>\n"
    "<body><h1>{code} {reason}</h1>\n<p>{detail}</p>\n<p>Request ID: <code>{rid}</code></p>\n"
    "<hr><p>bastion</p></body></html>\n"
)

_DETAILS = {
    400: "The request could not be understood.",
    404: "No route matches this request.",
    408: "The request took too long to arrive.",
    413: "The request body is larger than allowed.",
    414: "The request target is longer than allowed.",
    417: "The expectation given in Expect cannot be met.",
    421: "This request was sent to the wrong server.",
    431: "The request header section is larger than allowed.",
    500: "An internal error happened while handling the request.",
    502: "The upstream server could not be reached or sent an invalid response.",
    503: "No upstream server is available to handle the request.",
    504: "The upstream server did not answer in time.",
    505: "This HTTP version is not supported.",
}


def wants_json(accept: bytes | None) -> bool:
    if not accept:
        return False
    accept = accept.lower()
    return b"json" in accept and (b"text/html" not in accept or accept.find(b"json") < accept.find(b"text/html"))


def error_response(status: int, request_id: str, accept: bytes | None = None) -> Response:
    reason = reason_phrase(status)
    if wants_json(accept):
        body = json.dumps({"status": status, "error": reason, "request_id": request_id}) + "\n"
        content_type = "application/json"
    else:
        detail = _DETAILS.get(status, reason)
        body = _HTML.format(code=status, reason=reason, detail=detail, rid=request_id)
        content_type = "text/html; charset=utf-8"
    return Response(status, body, {"Cache-Control": "no-store"}, content_type=content_type)
