"""A fault-injecting HTTP proxy for S3 tests, on loopback, in front of moto's server.

Why a proxy rather than a patched client: the faults a flaky object store produces (throttling,
dropped connections, cut-off bodies, flipped bytes) must reach the *real* boto3 / s3transfer /
botocore code paths, retries included.  The proxy speaks plain HTTP/1.1 with keep-alive, forwards
every request unchanged to the upstream endpoint and, when a :class:`Fault` rule matches, answers
instead (or mangles the answer):

* ``503``      -- an S3 ``SlowDown`` error, as a throttled bucket sends
* ``500``      -- an S3 ``InternalError``
* ``drop``     -- read the request, close the connection without a response
* ``truncate`` -- forward, send the full ``Content-Length`` header but half the body, close
* ``corrupt``  -- forward, flip one byte of the body (same length: only a checksum can tell)

Rules match on method and a substring of the request path+query, fire on the first ``times``
matches or with probability ``prob`` (a seeded RNG), and every injected fault is counted, so a test
can assert that the faults really happened.  ``limit`` caps a probabilistic rule (each fault
costs a client backoff, so an uncapped rule makes a long test slow, not stricter).
"""

from __future__ import annotations

import dataclasses
import http.client
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "expect", "content-length"}
ACTIONS = ("503", "500", "drop", "truncate", "corrupt")


@dataclass
class Fault:
    action: str
    method: Optional[str] = None      # e.g. "GET"; None = any
    match: Optional[str] = None       # substring of path?query; None = any
    times: Optional[int] = None       # fire on the first N matching requests
    prob: float = 0.0                 # ... or with this probability (when times is None)
    limit: Optional[int] = None       # with prob: fire at most this often (keeps backoff time bounded)
    fired: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; one of {ACTIONS}")

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and (self.match is None or self.match in target)


_S3_ERROR = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{msg}</Message>"
             "<RequestId>faultproxy</RequestId></Error>")


class FaultProxy:
    """``with FaultProxy(upstream, [Fault(...)]) as proxy:`` -> ``proxy.url`` is the endpoint."""

    def __init__(self, upstream: str, faults: Optional[list[Fault]] = None, seed: int = 0,
                 gate: Optional[threading.Lock] = None, drop_headers: tuple[str, ...] = ()):
        """``gate``: a lock held while forwarding a conditional request (``If-Match`` /
        ``If-None-Match``).  moto checks the precondition and writes in two steps, so two
        concurrent conditional writes could both pass; serializing them gives the test server
        the atomicity AWS S3 guarantees.  Share one lock between proxies in front of one server.
        ``drop_headers``: request headers removed before forwarding (an endpoint that ignores
        them, e.g. one without conditional writes)."""
        u = urlsplit(upstream)
        self.gate = gate
        self.drop_headers = {h.lower() for h in drop_headers}
        self.upstream_host, self.upstream_port = u.hostname or "127.0.0.1", u.port or 80
        self.faults = [dataclasses.replace(f, fired=0) for f in faults or []]
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (method, target, action or "pass")
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_faults(self, faults: list[Fault]) -> None:
        """Replace the rules (copies with fresh counters, so one list can be installed twice)."""
        with self.lock:
            self.faults = [dataclasses.replace(f, fired=0) for f in faults]

    def decide(self, method: str, target: str) -> str:
        """The action for one request ("pass" when no rule fires); records it."""
        with self.lock:
            action = "pass"
            for f in self.faults:
                if not f.matches(method, target):
                    continue
                if f.times is not None:
                    fire = f.fired < f.times
                else:
                    fire = self.rng.random() < f.prob and (f.limit is None or f.fired < f.limit)
                if fire:
                    f.fired += 1
                    action = f.action
                    break
            if action != "pass":
                self.injected[action] += 1
            self.log.append((method, target, action))
            return action

    def requests(self, method: Optional[str] = None, match: str = "") -> list[tuple[str, str, str]]:
        with self.lock:
            return [r for r in self.log if (method is None or r[0] == method) and match in r[1]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy
    _upstream: Optional[http.client.HTTPConnection] = None

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() not in self.owner.drop_headers}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a stale keep-alive connection to upstream is our problem, not a fault
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=30)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self._upstream.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes, declared: Optional[int] = None) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if declared is None else declared))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _handle(self) -> None:
        body = self._body()
        action = self.owner.decide(self.command, self.path)
        if action == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if action in ("503", "500"):
            code, msg = ("SlowDown", "Please reduce your request rate.") if action == "503" else \
                ("InternalError", "We encountered an internal error. Please try again.")
            xml = _S3_ERROR.format(code=code, msg=msg).encode()
            self._send(int(action), "Slow Down" if action == "503" else "Internal Server Error",
                       [("Content-Type", "application/xml")], xml)
            return
        if self.owner.gate is not None and ("If-Match" in self.headers or "If-None-Match" in self.headers):
            with self.owner.gate:
                status, reason, headers, data = self._forward(body)
        else:
            status, reason, headers, data = self._forward(body)
        if action == "truncate" and self.command == "GET" and len(data) > 1:
            self._send(status, reason, headers, data[: len(data) // 2], declared=len(data))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if action == "corrupt" and self.command == "GET" and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
        self._send(status, reason, headers, data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()
