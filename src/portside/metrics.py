"""Prometheus metrics: the ``stats`` document rendered with prometheus_client, served over HTTP.

The exporter reads the same statistics as ``portside ctl stats`` (summed over the workers by
the supervisor), so metrics and the control command never disagree. ``MetricsServer`` is a
tiny HTTP endpoint that runs on the supervisor's (or the single server's) own loop, with no
thread: a thread in the supervisor would be copied, mid-whatever, into every forked worker.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from portside.control import protocol
from portside.control.server import ControlTarget
from portside.engine.reactor import Reactor
from portside.engine.service import ServiceClient, SideClient, SideListener
from portside.errors import ListenError
from portside.statistics import TTFB_BUCKETS

logger = logging.getLogger("portside.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8 * 1024

_COUNTERS = (  # stats key, metric name, help
    ("accepted", "connections_accepted", "Connections accepted from the kernel."),
    ("closed", "connections_closed", "Connections closed, for any reason."),
    ("first_data_timeouts", "first_data_timeouts",
     "Data-first connections closed for sending nothing in time."),
    ("evicted", "evicted", "Silent pending connections closed to make room at the ceiling."),
    ("limited", "limited", "Times the listener reached max_connections and stopped accepting."),
    ("accept_errors", "accept_errors", "accept() failures (EMFILE and the like)."),
    ("proxy_errors", "proxy_protocol_errors", "Connections refused for a bad PROXY header."),
    ("tls_failures", "tls_failures", "TLS handshakes that failed and bad TLS records."),
    ("bytes_in", "received_bytes", "Bytes read from clients."),
    ("bytes_out", "sent_bytes", "Bytes written to clients."),
)


class StatsCollector(Collector):
    """Metric families from one ``stats`` document."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def collect(self) -> Iterator[Metric]:
        listeners = self.document["listeners"]
        for key, name, text in _COUNTERS:
            family = CounterMetricFamily(f"portside_{name}", text, labels=["listener"])
            for entry in listeners:
                family.add_metric([entry["name"]], entry[key])
            yield family
        timeouts = CounterMetricFamily("portside_timeouts", "Connections closed by a timeout.",
                                       labels=["listener", "kind"])
        for entry in listeners:
            for kind in ("idle", "read", "write"):
                timeouts.add_metric([entry["name"], kind], entry[f"{kind}_timeouts"])
        yield timeouts
        for key, text in (("active", "Connections handed to the handler."),
                          ("pending", "Accepted connections waiting for first data.")):
            gauge = GaugeMetricFamily(f"portside_connections_{key}", text, labels=["listener"])
            for entry in listeners:
                gauge.add_metric([entry["name"]], entry[key])
            yield gauge
        histogram = HistogramMetricFamily(
            "portside_time_to_first_byte_seconds", "From accept to a connection's first byte.",
            labels=["listener"])
        for entry in listeners:
            cumulative, buckets = 0, []
            for bound, count in zip(TTFB_BUCKETS, entry["ttfb_buckets"], strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            histogram.add_metric([entry["name"]], buckets, entry["ttfb_sum"])
        yield histogram
        workers = self.document["workers"]
        for key, name, text in (
                ("connections", "worker_connections", "Open connections per worker process."),
                ("loop_lag", "worker_loop_lag_seconds", "How late the worker's loop ran a timer."),
                ("uptime", "worker_uptime_seconds", "Seconds since the worker started.")):
            gauge = GaugeMetricFamily(f"portside_{name}", text, labels=["pid"])
            for worker in workers:
                gauge.add_metric([str(worker["pid"])], worker[key])
            yield gauge
        for key, text in (("free", "Pooled objects ready for reuse."),
                          ("in_use", "Pooled objects lent out."),
                          ("hits", "Requests met from the pool."),
                          ("misses", "Requests that had to allocate.")):
            pool_family: CounterMetricFamily | GaugeMetricFamily = (
                CounterMetricFamily if key in ("hits", "misses") else GaugeMetricFamily
            )(f"portside_pool_{key}", text, labels=["pool"])
            for pool, figures in self.document["pools"].items():
                pool_family.add_metric([pool], figures[key])
            yield pool_family
        yield GaugeMetricFamily("portside_accepting_paused", "1 while accepting is paused.",
                                value=int(bool(self.document["accepting_paused"])))


def exposition(document: dict[str, Any]) -> bytes:
    """The Prometheus text format of a ``stats`` document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(document))
    return generate_latest(registry)


def bind_metrics(address: str) -> socket.socket:
    """Listen on ``HOST:PORT`` for scrapes; a clear ListenError when that cannot be done."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], info[1], info[2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(16)
    except (OSError, ValueError) as exc:
        raise ListenError(f"cannot serve metrics on {address}: {exc}") from None
    sock.setblocking(False)
    return sock


class _Scrape(SideClient):
    """One HTTP request for /metrics: read the request head, answer once, close."""

    close_when_sent = True

    def __init__(self, sock: socket.socket, target: ControlTarget, reactor: Reactor,
                 on_close: Callable[[ServiceClient], None]) -> None:
        super().__init__(sock, reactor, on_close)
        self.target = target
        self.request = bytearray()
        self.answered = False

    def received(self, data: bytes) -> None:
        self.request += data
        if self.answered:
            return
        if b"\r\n\r\n" not in self.request:
            if len(self.request) > MAX_REQUEST:
                self.respond(431, b"request too large\n")
            return
        self.answered = True
        method, _, rest = bytes(self.request).partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method != b"GET":
            self.respond(405, b"only GET\n")
        elif path not in (b"/metrics", b"/"):
            self.respond(404, b"try /metrics\n")
        else:
            self.target.control("stats", self._got_stats)

    def _got_stats(self, reply: bytes) -> None:
        try:
            document = protocol.parse_reply(reply.rstrip(b"\n"))
            body = exposition(document)
        except Exception as exc:  # never take the server down for a scrape
            logger.exception("metrics scrape failed")
            self.respond(500, f"stats unavailable: {exc}\n".encode())
            return
        self.respond(200, body, CONTENT_TYPE)

    def respond(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large", 500: "Internal Server Error"}[status]
        self.answered = True
        self.send((f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                   ).encode() + body)


class MetricsServer(SideListener):
    """Serves ``/metrics`` from a control target's ``stats``, on the owner's loop."""

    def __init__(self, address: str, target: ControlTarget) -> None:
        self.address = address
        self.target = target
        super().__init__(bind_metrics(address), self._client, max_clients=64)

    def _client(self, sock: socket.socket, reactor: Reactor,
                on_close: Callable[[ServiceClient], None]) -> _Scrape:
        return _Scrape(sock, self.target, reactor, on_close)

    def attach(self, reactor: Reactor) -> None:
        super().attach(reactor)
        host, port = self.sock.getsockname()[:2]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        logger.info("metrics on http://%s/metrics", shown)
