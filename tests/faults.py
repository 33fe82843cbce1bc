"""A fault-injecting HTTP proxy for tests: put it in front of the moto server and storage misbehaves on cue.

    proxy = FaultProxy(upstream="http://127.0.0.1:5000")      # started on a loopback port
    proxy.fail("cut", method="GET", path=r"/photos/a\\.jpg$", times=1)   # the first matching GET loses half its body
    proxy.fail("503", method="PUT", path=r"\\.tar$")          # every upload of a tar is throttled
    proxy.requests                                              # [(method, path, fault or None)], in arrival order
    proxy.stop()

Faults, each as a real server or network would show it:
    "503"    HTTP 503 with S3's SlowDown error document (throttling)
    "500"    HTTP 500 with S3's InternalError document
    "403"    HTTP 403 AccessDenied (a permanent error: clients do not retry it)
    "reset"  the request is read, then the connection is reset (RST) before any response
    "cut"    the response is forwarded with its full Content-Length but only half its body, then the connection
             is closed: aiohttp raises ClientPayloadError, as on a connection reset mid-body

Injection is deterministic: a rule fails the first `times` requests that match it (all of them when `times` is
None), counted in the order they reach the proxy; with rules on distinct objects, interleaving cannot change
which requests fail. A rule given several faults takes them in turn. Every response closes its connection
(`Connection: close`), so a client never reuses a connection the proxy is about to drop.

`through(proxy)` points every S3 client at the proxy (AWS_ENDPOINT_URL, inherited by subprocesses and passed
to Ray workers) and turns botocore's own retries off (AWS_MAX_ATTEMPTS=1), so that request counts are exact:
s3fs's retries (S3FileSystem.retries attempts per call) and the project's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import socket
import socketserver
import struct
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

_ERRORS = {
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}
FAULTS = (*_ERRORS, "reset", "cut")


@dataclass
class Rule:
    faults: tuple[str, ...]
    method: str | None
    path: re.Pattern | None
    times: int | None
    hits: int = 0
    _turn: itertools.cycle = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._turn = itertools.cycle(self.faults)

    def next_fault(self) -> str:
        self.hits += 1
        return next(self._turn)

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return (self.method is None or self.method == method) and (self.path is None or bool(self.path.search(path)))


class FaultProxy:
    """See the module docstring. UPSTREAM: the base URL of the real server."""

    def __init__(self, upstream: str):
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.rules: list[Rule] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def fail(
        self, fault: str | tuple[str, ...], method: str | None = None, path: str | None = None, times: int | None = None
    ) -> Rule:
        """Inject FAULT (or each of several in turn) into the requests with METHOD whose path (with its query)
        matches the regex PATH: the first TIMES of them, or all when TIMES is None. Rules are tried in the
        order they were added."""
        faults = (fault,) if isinstance(fault, str) else tuple(fault)
        unknown = [f for f in faults if f not in FAULTS]
        if unknown or not faults:
            raise ValueError(f"unknown fault(s) {unknown}; faults: {FAULTS}")
        rule = Rule(faults, method, re.compile(path) if path else None, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """No more faults: every request is forwarded as it is."""
        with self._lock:
            self.rules = []

    def count(self, method: str, path: str) -> int:
        """Requests seen with METHOD whose path matches the regex PATH, faulted or not."""
        return sum(1 for m, p, _ in self.requests if m == method and re.search(path, p))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            rule = next((r for r in self.rules if r.matches(method, path)), None)
            fault = rule.next_fault() if rule is not None else None
            self.requests.append((method, urllib.parse.unquote(path), fault))
            return fault

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        f = conn.makefile("rb")
        try:
            head = _read_head(f)
            if head is None:
                return
            method, path = head[0].split(" ")[:2]
            headers = head[1:]
            if any(h.lower() == "expect: 100-continue" for h in headers):
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                headers = [h for h in headers if h.lower() != "expect: 100-continue"]
            body = _read_body(f, headers)
            fault = self._decide(method, path)
            if fault == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
                return
            if fault in _ERRORS:
                conn.sendall(_error_response(*_ERRORS[fault], head_only=method == "HEAD"))
                return
            response = self._forward(head[0], headers, body)
            conn.sendall(_cut(response) if fault == "cut" else response)
        except OSError:
            pass  # the client went away: nothing to answer
        finally:
            f.close()
            conn.close()

    def _forward(self, request_line: str, headers: list[str], body: bytes) -> bytes:
        """The upstream's whole response to the request, with `Connection: close`."""
        headers = [h for h in headers if not h.lower().startswith("connection:")] + ["Connection: close"]
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall("\r\n".join([request_line, *headers, "", ""]).encode("latin-1") + body)
            chunks = []
            while data := up.recv(1 << 16):
                chunks.append(data)
        raw = b"".join(chunks)
        top, sep, rest = raw.partition(b"\r\n\r\n")
        lines = [ln for ln in top.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        return b"\r\n".join([*lines, b"Connection: close"]) + sep + rest


def _read_head(f) -> list[str] | None:
    """The request line and header lines; None when the client closed the connection first."""
    lines = []
    while True:
        line = f.readline(65536)
        if not line:
            return None
        line = line.rstrip(b"\r\n").decode("latin-1")
        if not line:
            return lines or None
        lines.append(line)


def _header(headers: list[str], name: str) -> str | None:
    for h in headers:
        k, _, v = h.partition(":")
        if k.strip().lower() == name:
            return v.strip()
    return None


def _read_body(f, headers: list[str]) -> bytes:
    """The request body as it came (a chunked body stays chunked: it is forwarded with its headers)."""
    if (_header(headers, "transfer-encoding") or "").lower() == "chunked":
        raw = []
        while True:
            line = f.readline(65536)
            raw.append(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := f.readline(65536)) not in (b"\r\n", b"\n", b""):
                    raw.append(trailer)
                raw.append(b"\r\n")
                return b"".join(raw)
            raw.append(f.read(size + 2))
    return f.read(int(_header(headers, "content-length") or 0))


def _error_response(status: int, phrase: str, code: str, message: str, head_only: bool = False) -> bytes:
    """An S3 error response; to a HEAD request without its body, as S3 answers (a body there breaks clients)."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>FAULT</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def _cut(response: bytes) -> bytes:
    """RESPONSE with its headers as they are and half its body."""
    top, sep, body = response.partition(b"\r\n\r\n")
    return top + sep + body[: len(body) // 2]


@contextlib.contextmanager
def through(proxy: FaultProxy):
    """Every S3 client pointed at PROXY, botocore's own retries off (module docstring); restored afterwards.
    s3fs's retries (`S3FileSystem.retries`, a class attribute: no setting reaches another process) stay on:
    a fault must outlast them to reach the project's code, and tests count with them."""
    import s3fs

    env = {"AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients keep the endpoint they were made with
    try:
        yield proxy
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


class MotoRecorder:
    """What the S3 server at ENDPOINT is asked, from moto's own request recorder (server side): call the
    recorder for [(method, object path, query)] since the last `reset()`."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def _call(self, action: str) -> bytes:
        req = urllib.request.Request(
            f"{self.endpoint}/moto-api/recorder/{action}", method="GET" if action.startswith("download") else "POST"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def start(self) -> None:
        self._call("reset-recording")
        self._call("start-recording")

    def stop(self) -> None:
        self._call("stop-recording")

    def reset(self) -> None:
        self._call("reset-recording")

    def __call__(self) -> list[tuple[str, str, str]]:
        out = []
        for line in self._call("download-recording").decode().splitlines():
            if line.strip():
                e = json.loads(line)
                u = urllib.parse.urlsplit(e["url"])
                out.append((e["method"], urllib.parse.unquote(u.path), u.query))
        return out
