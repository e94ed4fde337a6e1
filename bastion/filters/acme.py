"""Answers ACME HTTP-01 challenges from the files the ACME manager writes (see bastion.tls.acme)."""

from __future__ import annotations

import os

from bastion.proxy.exchange import Response
from bastion.tls.acme import CHALLENGE_PREFIX


class AcmeChallenge:
    keeps_request = True  # never changes the request: the cache may keep keys per repeated head

    def __init__(self, storage: str):
        self.folder = os.path.join(storage, "challenges")

    def request_filter(self, ex):
        if not ex.path.startswith(CHALLENGE_PREFIX):
            return None
        token = ex.path[len(CHALLENGE_PREFIX):].decode("latin-1")
        if not token or "/" in token or token.startswith("."):
            return Response(404, "unknown challenge\n", content_type="text/plain")
        try:
            with open(os.path.join(self.folder, token), "rb") as f:
                return Response(200, f.read(), content_type="application/octet-stream")
        except OSError:
            return Response(404, "unknown challenge\n", content_type="text/plain")
