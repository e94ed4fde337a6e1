"""A small ctypes binding of libmodsecurity3's C API (Debian's `libmodsecurity3`).

One `Engine` holds a loaded rule set; `Engine.inspect` runs one request through it and returns what the
engine decided and which rules matched. Each libmodsecurity call is a plain C call: ctypes releases the GIL
around it, so inspections may run in a thread pool while the event loop keeps serving.

Rule matches are collected through the engine's log callback, which libmodsecurity calls synchronously in
the thread that runs the transaction; a thread-local list therefore gathers each transaction's matches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import threading
from dataclasses import dataclass, field

_LIBRARY_PATHS = (
    "libmodsecurity.so.3",
    "/usr/lib/x86_64-linux-gnu/libmodsecurity.so.3",
    "/usr/lib/aarch64-linux-gnu/libmodsecurity.so.3",
    "/usr/local/modsecurity/lib/libmodsecurity.so.3",
    "/usr/lib/libmodsecurity.so.3",
)


class ModSecurityError(Exception):
    pass


class _Intervention(ctypes.Structure):
    _fields_ = [
        ("status", ctypes.c_int),
        ("pause", ctypes.c_int),
        ("url", ctypes.c_void_p),
        ("log", ctypes.c_void_p),
        ("disruptive", ctypes.c_int),
    ]


_LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)

_lib = None
_libc = None


class _Library:
    """The C API's functions, each bound with its signature and GIL policy."""


def library():
    """The loaded libmodsecurity (loaded once); raises ModSecurityError when it is not installed."""
    global _lib, _libc
    if _lib is not None:
        return _lib
    candidates = [ctypes.util.find_library("modsecurity")] + list(_LIBRARY_PATHS)
    lib = None
    errors = []
    for name in candidates:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            errors.append(str(exc))
    if lib is None:
        raise ModSecurityError("libmodsecurity3 is not installed (apt-get install libmodsecurity3)")
    p, c, i, s = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
    signatures = {
        "msc_init": (p, []),
        "msc_who_am_i": (c, [p]),
        "msc_set_connector_info": (None, [p, c]),
        "msc_set_log_cb": (None, [p, _LOG_CB]),
        "msc_cleanup": (None, [p]),
        "msc_create_rules_set": (p, []),
        "msc_rules_add_file": (i, [p, c, ctypes.POINTER(c)]),
        "msc_rules_add": (i, [p, c, ctypes.POINTER(c)]),
        "msc_rules_cleanup": (i, [p]),
        "msc_new_transaction": (p, [p, p, p]),
        "msc_new_transaction_with_id": (p, [p, p, c, p]),
        "msc_process_connection": (i, [p, c, i, c, i]),
        "msc_process_uri": (i, [p, c, c, c]),
        "msc_add_n_request_header": (i, [p, c, s, c, s]),
        "msc_process_request_headers": (i, [p]),
        "msc_append_request_body": (i, [p, c, s]),
        "msc_process_request_body": (i, [p]),
        "msc_intervention": (i, [p, ctypes.POINTER(_Intervention)]),
        "msc_process_logging": (i, [p]),
        "msc_transaction_cleanup": (None, [p]),
    }
    # Calls that take microseconds keep the GIL (a second handle on the same library, through PyDLL):
    # releasing and taking it back costs more than the call, and with other threads waiting it means a
    # context switch each time. The phases that run rules (hundreds of microseconds) release it.
    quick = ctypes.PyDLL(lib._name)
    slow = {"msc_new_transaction", "msc_new_transaction_with_id", "msc_process_request_headers",
            "msc_process_request_body", "msc_process_logging", "msc_rules_add_file", "msc_rules_add"}
    bound = _Library()
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib if name in slow else quick, name)
        fn.restype = restype
        fn.argtypes = argtypes
        setattr(bound, name, fn)
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.free.argtypes = [ctypes.c_void_p]
    _libc.free.restype = None
    _lib = bound
    return _lib


@dataclass(slots=True)
class RuleMatch:
    id: str
    message: str
    data: str
    severity: str | None
    paranoia_level: int | None
    tags: list[str]


@dataclass(slots=True)
class Verdict:
    """What the engine made of one request: `status` is the intervention's status (0: none)."""

    status: int = 0
    matches: list[RuleMatch] = field(default_factory=list)
    intervention_log: str | None = None


_FIELD = re.compile(r'\[(\w+) "((?:[^"\\]|\\.)*)"\]')


def parse_log_line(text: str) -> RuleMatch | None:
    """libmodsecurity's text log line ('ModSecurity: Warning. ... [id "942100"] [msg "..."] ...') as a match."""
    fields: dict[str, list[str]] = {}
    for key, value in _FIELD.findall(text):
        fields.setdefault(key, []).append(value)
    ids = fields.get("id")
    if not ids:
        return None
    tags = fields.get("tag", [])
    level = None
    for tag in tags:
        if tag.startswith("paranoia-level/"):
            try:
                level = int(tag.rsplit("/", 1)[1])
            except ValueError:
                pass
    return RuleMatch(
        id=ids[0],
        message=(fields.get("msg") or [""])[0],
        data=(fields.get("data") or [""])[0],
        severity=(fields.get("severity") or [None])[0],
        paranoia_level=level,
        tags=tags,
    )


_collecting = threading.local()


@_LOG_CB
def _log_callback(data, message):
    sink = getattr(_collecting, "sink", None)
    if sink is not None and message:
        sink.append(ctypes.string_at(message).decode("utf-8", "replace"))


class Engine:
    """A libmodsecurity instance with one rule set, loaded from files in order."""

    def __init__(self, files: list[str]):
        lib = library()
        self.lib = lib
        self.rules = self.modsec = None
        self.owner = os.getpid()
        self.modsec = lib.msc_init()
        lib.msc_set_connector_info(self.modsec, b"bastion")
        lib.msc_set_log_cb(self.modsec, _log_callback)
        self.rules = lib.msc_create_rules_set()
        for path in files:
            error = ctypes.c_char_p()
            if lib.msc_rules_add_file(self.rules, path.encode(), ctypes.byref(error)) < 0:
                text = error.value.decode("utf-8", "replace") if error.value else "unknown error"
                self.close()
                raise ModSecurityError(f"{path}: {text.strip()}")

    def __del__(self):
        # Frees a dropped rule set (an old configuration after a reload) in the process that loaded it. A
        # forked worker never frees one: its inspection threads may still be inside the library at exit.
        if self.owner == os.getpid():
            self.close()

    def close(self) -> None:
        if self.rules:
            self.lib.msc_rules_cleanup(self.rules)
            self.rules = None
        if self.modsec:
            self.lib.msc_cleanup(self.modsec)
            self.modsec = None

    def inspect(
        self,
        client_ip: str,
        client_port: int,
        server_ip: str,
        server_port: int,
        method: bytes,
        uri: bytes,
        http_version: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        request_id: bytes | None = None,
    ) -> Verdict:
        """Run phases 1 and 2 (and the logging phase when something matched) for one request."""
        lib = self.lib
        sink: list[str] = []
        _collecting.sink = sink
        verdict = Verdict()
        if request_id:
            tx = lib.msc_new_transaction_with_id(self.modsec, self.rules, request_id, None)
        else:
            tx = lib.msc_new_transaction(self.modsec, self.rules, None)
        try:
            # The engine may decide after any phase; once it has, the later phases are not run.
            lib.msc_process_connection(tx, client_ip.encode(), client_port, server_ip.encode(), server_port)
            lib.msc_process_uri(tx, uri, method, http_version.encode())
            status = self._intervention(tx, verdict)
            if not status:
                add = lib.msc_add_n_request_header
                for name, value in headers:
                    add(tx, name, len(name), value, len(value))
                lib.msc_process_request_headers(tx)
                status = self._intervention(tx, verdict)
            if not status:
                if body:
                    lib.msc_append_request_body(tx, body, len(body))
                # Also without a body: CRS evaluates its blocking rules in phase 2.
                lib.msc_process_request_body(tx)
                status = self._intervention(tx, verdict)
            if sink:
                lib.msc_process_logging(tx)
        finally:
            lib.msc_transaction_cleanup(tx)
            _collecting.sink = None
        verdict.status = status
        if verdict.intervention_log:
            sink.append(verdict.intervention_log)  # the disruptive rule (CRS: 949110) is logged only here
        seen = set()
        for line in sink:
            match = parse_log_line(line)
            if match is not None and match.id not in seen:
                seen.add(match.id)
                verdict.matches.append(match)
        return verdict

    def _intervention(self, tx, verdict: Verdict) -> int:
        it = _Intervention()
        it.status = 200
        if not self.lib.msc_intervention(tx, ctypes.byref(it)):
            return 0
        if it.log:
            verdict.intervention_log = ctypes.string_at(it.log).decode("utf-8", "replace")
            _libc.free(it.log)
        if it.url:
            _libc.free(it.url)
        if not it.disruptive:
            return 0
        return it.status if it.status >= 400 else 403
