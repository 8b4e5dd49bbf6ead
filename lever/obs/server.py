"""Serving a Telemetry registry on /metrics for long stages that Prometheus scrapes directly.

Batch pods normally push to a Pushgateway, but a multi-hour GRPO stage can also be scraped live
(``LEVER_METRICS_PORT``), which gives per-scrape resolution and does not depend on the gateway.
Kept apart from telemetry.py so that the exporter has no thread/socket code in it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric

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


class RegistrySwitch:
    """A collector that forwards to whichever registry is current.

    The local runner executes many stages in one process, each with its own Telemetry registry,
    but ``LEVER_METRICS_PORT`` can be bound only once: the process keeps one server and each new
    stage attaches its registry to it."""

    def __init__(self) -> None:
        self.current: Optional[CollectorRegistry] = None

    def collect(self) -> Iterable[Metric]:
        return self.current.collect() if self.current is not None else []

    def restricted_registry(self, names: Iterable[str]):  # used by ?name[]=... scrapes
        return (self.current or CollectorRegistry()).restricted_registry(names)


_process_servers: dict[tuple[str, int], tuple[MetricsServer, RegistrySwitch]] = {}
_process_lock = threading.Lock()


def serve_process_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Expose ``registry`` on the process-wide server for (addr, port), starting it on first use.
    The server lives as long as the process (daemon thread); later calls switch its registry."""
    with _process_lock:
        entry = _process_servers.get((addr, port))
        if entry is None or entry[0]._server is None:
            switch = RegistrySwitch()
            server, thread = start_http_server(port, addr=addr, registry=switch)  # type: ignore[arg-type]
            entry = (MetricsServer(server, thread, addr, server.server_port), switch)
            _process_servers[(addr, port)] = entry
            log.info("serving metrics on %s:%d/metrics", addr, entry[0].port)
        entry[1].current = registry
        return entry[0]
