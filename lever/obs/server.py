"""Serving a Telemetry registry on /metrics for long stages that Prometheus scrapes directly.

Batch pods normally push to a Pushgateway, but a multi-hour GRPO stage can also be scraped live
(``LEVER_METRICS_PORT``), which gives per-scrape resolution and does not depend on the gateway.
Kept apart from telemetry.py so that the exporter has no thread/socket code in it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("lever.obs")


@dataclass
class MetricsServer:
    """A running /metrics endpoint; ``close()`` stops it (idempotent)."""

    _server: object
    _thread: threading.Thread
    addr: str
    port: int

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("", "0.0.0.0") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Start a daemon HTTP server exposing ``registry``; ``port=0`` picks a free port."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    actual = server.server_port
    log.info("serving metrics on %s:%d/metrics", addr, actual)
    return MetricsServer(server, thread, addr, actual)
