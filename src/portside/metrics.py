"""Prometheus metrics: the ``stats`` document rendered with prometheus_client, served over HTTP.

The exporter reads the same statistics as ``portside ctl stats`` (summed over the workers by
the supervisor), so metrics and the control command never disagree, and every family is
derived from the figures declared in ``portside.statistics``: its name (``portside_`` and the
field's name, or the declared metric), help text, kind and labels. Per-process series are
labelled by worker number (``worker="1"``), which a replacement worker keeps, not by pid; the
supervisor's own process figures carry ``worker="supervisor"``. A scraper that asks for
OpenMetrics (``Accept: application/openmetrics-text``) gets it.

``MetricsServer`` is a tiny HTTP endpoint on the supervisor's (or the single server's) own loop,
with no thread: a thread in the supervisor would be copied, mid-whatever, into every forked
worker. It cannot be locked out: a request head must arrive within ``head_timeout``, nothing
past the head is read, the answer must be taken within the same period again, and a newcomer
to a full table replaces the oldest client still sending its head (``engine.service``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from portside.config import address_label
from portside.control import protocol
from portside.control.server import ControlTarget
from portside.engine.reactor import Reactor
from portside.engine.service import ServiceClient, SideClient, SideListener
from portside.errors import ListenError
from portside.statistics import (
    POOL_FIGURES,
    TTFB_BUCKETS,
    Figure,
    ListenerStatistics,
    OutboundStatistics,
    UpstreamStatistics,
    WorkerStatistics,
    figures,
    metric_name,
)

logger = logging.getLogger("portside.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8 * 1024
HEAD_TIMEOUT = 5.0  # seconds for a scraper to send its request head, and again to take the answer
MAX_CLIENTS = 64
LINGER_BYTES = 1024 * 1024  # dropped after an answer before giving up on a clean close
#: The metrics port's descriptor, handed by a supervisor to its successor (USR2).
INHERIT_ENV = "PORTSIDE_METRICS_FD"

Family = CounterMetricFamily | GaugeMetricFamily


class MetricsTarget(ControlTarget, Protocol):
    """What the endpoint serves: ``stats`` through ``control``, and readiness."""

    def readiness(self) -> str | None:
        """None while new connections are welcome (listening, not draining, not paused);
        else why not, in a word or two (``/readyz`` answers 503 with it)."""
        ...


class _Families:
    """Families by name, made on first use, in the order first used."""

    def __init__(self) -> None:
        self.made: dict[str, Family | HistogramMetricFamily] = {}

    def get(self, name: str, declared: Figure, labels: list[str]) -> Family:
        family = self.made.get(name)
        if family is None:
            kind = CounterMetricFamily if declared.kind == "counter" else GaugeMetricFamily
            family = self.made[name] = kind(name, declared.help, labels=labels)
        assert not isinstance(family, HistogramMetricFamily)
        return family


def _numeric(declared: Figure) -> bool:
    return declared.kind in ("counter", "gauge") and declared.metric != ""


class StatsCollector(Collector):
    """Metric families from one ``stats`` document, derived from the declared figures."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def collect(self) -> Iterator[Metric]:
        families = _Families()
        _per_entry(families, ListenerStatistics, self.document["listeners"], "listener")
        _per_entry(families, OutboundStatistics, self.document.get("outbound", []), "outbound")
        _per_entry(families, UpstreamStatistics, self.document.get("upstreams", []), "upstream")
        processes = _by_slot(self.document["workers"])
        supervisor = self.document.get("supervisor")
        for name, declared in figures(WorkerStatistics):
            if not _numeric(declared):
                continue
            family_name = metric_name(name, declared)
            family = families.get(family_name, declared, ["worker"])
            for slot, process in processes.items():
                family.add_metric([slot], float(process[name]))
            if supervisor is not None and family_name.startswith("portside_process_"):
                family.add_metric(["supervisor"], float(supervisor[name]))
        for name, declared in POOL_FIGURES.items():
            if _numeric(declared):
                family = families.get(metric_name(name, declared), declared, ["pool"])
                for pool, values in self.document["pools"].items():
                    family.add_metric([pool], values[name])
        yield from families.made.values()
        for gauge, _, _, help_text in DOCUMENT_FAMILIES:
            key = gauge.removeprefix("portside_")
            yield GaugeMetricFamily(gauge, help_text, value=int(bool(self.document.get(key))))


def _per_entry(families: _Families, cls: type[Any], entries: list[dict[str, Any]],
               label: str) -> None:
    """The families of one kind of entry (listeners, outbound), labelled by its name. A
    histogram's sum is the figure named like it with ``_sum`` for ``_buckets``."""
    for name, declared in figures(cls):
        constant = dict(declared.labels)
        family_name = metric_name(name, declared)
        if _numeric(declared):
            exported = [families.get(family_name, declared, [label, *constant])]
            if declared.deprecated is not None:  # the former name, for one release
                exported.append(families.get(
                    metric_name(name, dataclasses.replace(declared, metric=declared.deprecated)),
                    dataclasses.replace(declared, help=f"Deprecated: use {family_name} (this "
                                        f"name goes in the next release). {declared.help}"),
                    [label, *constant]))
            for family in exported:
                for entry in entries:
                    if name in entry:
                        family.add_metric([entry["name"], *constant.values()],
                                          float(entry[name]))
        elif declared.kind == "reasons":
            family = families.get(family_name, Figure("counter", declared.help),
                                  [label, "reason"])
            for entry in entries:
                for reason, count in sorted(entry.get(name, {}).items()):
                    family.add_metric([entry["name"], reason], count)
        elif declared.kind == "histogram":
            histogram = HistogramMetricFamily(family_name, declared.help, labels=[label])
            total = name.replace("_buckets", "_sum")
            for entry in entries:
                cumulative, buckets = 0, []
                for bound, count in zip(TTFB_BUCKETS, entry[name], strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound),
                                    cumulative))
                histogram.add_metric([entry["name"]], buckets, entry[total])
            families.made[family_name] = histogram


def _by_slot(processes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Process entries by slot; while a restart hands a slot over, its two processes' figures
    are added up, so a slot never has two series."""
    slots: dict[str, dict[str, Any]] = {}
    for process in processes:
        held = slots.get(process["slot"])
        if held is None:
            slots[process["slot"]] = dict(process)
            continue
        for key, value in process.items():
            if isinstance(value, (int, float)) and key not in ("pid", "max_fds"):
                held[key] = max(held[key], value) if key.startswith(("uptime", "loop")) else \
                    held[key] + value
    return slots


def exposition(document: dict[str, Any], open_metrics: bool = False) -> bytes:
    """The Prometheus text format (or OpenMetrics) of a ``stats`` document."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(document))
    if open_metrics:
        return bytes(openmetrics.generate_latest(registry))  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))


def bind_metrics(address: str) -> socket.socket:
    """Listen on ``HOST:PORT`` for scrapes; a clear ListenError when that cannot be done."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenError(f"cannot serve metrics on {address}: expected HOST:PORT with a port "
                          "0-65535")
    try:
        info = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], info[1], info[2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(MAX_CLIENTS)
    except (OSError, ValueError) as exc:
        raise ListenError(f"cannot serve metrics on {address}: {exc}") from None
    sock.setblocking(False)
    return sock


def adopt_metrics(address: str) -> socket.socket | None:
    """The metrics socket a supervisor handed over (``INHERIT_ENV``) if it listens where
    ``address`` asks (any port, for port 0); else None, and it is closed."""
    inherited = os.environ.pop(INHERIT_ENV, "")
    if not inherited.isdigit():
        return None
    try:
        sock = socket.socket(fileno=int(inherited))
        bound = sock.getsockname()
    except OSError:
        return None
    port_text = address.rpartition(":")[2]
    if port_text.isdigit() and int(port_text) in (0, bound[1]):
        sock.setblocking(False)
        return sock
    sock.close()  # --metrics changed: bind the new address, the old one stays its owner's
    return None


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class Scrape(SideClient):
    """One HTTP request (/metrics, /healthz, /readyz): read the request head, answer once,
    close."""

    close_when_sent = True

    def __init__(self, sock: socket.socket, target: MetricsTarget, reactor: Reactor,
                 on_close: Callable[[ServiceClient], None], timeout: float) -> None:
        super().__init__(sock, reactor, on_close, timeout)
        self.target = target
        self.head = bytearray()
        self.open_metrics = False
        self.lingering = 0  # 1 + bytes dropped once the answer is sent; 0 until then

    def finished(self) -> None:
        """Answer sent: FIN, then drop what the client still sends until it closes, so the
        kernel does not reset the connection over unread bytes before the answer arrives
        (nginx's lingering close); bounded by ``LINGER_BYTES`` and the deadline."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.close_when_sent = False
        self.lingering = 1
        self.reading = True
        self.reactor.modify(self.fd, readable=True, writable=False)

    def received(self, data: bytes) -> None:
        if self.lingering:
            self.lingering += len(data)
            if self.lingering > LINGER_BYTES:
                self.close()
            return
        if not self.reading:
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_REQUEST:
                self.respond(431, b"request too large\n")
            return
        del self.head[end:]  # whatever came after the head is not ours to keep
        self.stop_reading()
        request_line, *headers = bytes(self.head).split(b"\r\n")
        method, _, rest = request_line.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        for header in headers:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"accept" and \
                    b"application/openmetrics-text" in value.lower():
                self.open_metrics = True
        if path in (b"/healthz", b"/readyz") and method in (b"GET", b"HEAD"):
            self._health(path == b"/readyz", method == b"HEAD")
        elif method != b"GET":
            self.respond(405, b"only GET\n")
        elif path not in (b"/metrics", b"/"):
            self.respond(404, b"try /metrics, /healthz or /readyz\n")
        else:
            self.answering = True
            self.target.control(protocol.Request("stats"), self._got_stats)

    def _health(self, readiness: bool, head: bool) -> None:
        """``/healthz``: 200 while this process's loop answers (liveness). ``/readyz``: 200
        while new connections are welcome, 503 from the moment draining starts, so that a
        balancer's check (HAProxy ``option httpchk``, a Kubernetes readiness probe) stops
        sending before connections are refused."""
        why = self.target.readiness() if readiness else None
        body = b"ok\n" if why is None else f"not ready: {why}\n".encode()
        self.respond(200 if why is None else 503, body, head=head)

    def expired(self) -> None:
        self._timer = None
        if self.reading and not self.answering and not self.lingering:
            self.respond(408, b"no request in time\n")  # sent if the socket takes it now
        self.close()

    def _got_stats(self, reply: bytes) -> None:
        self.answering = False
        try:
            document = protocol.parse_reply(reply.rstrip(b"\n"))
            body = exposition(document, self.open_metrics)
        except Exception as exc:  # never take the server down for a scrape
            logger.exception("metrics scrape failed")
            self.respond(500, f"stats unavailable: {exc}\n".encode())
            return
        self.respond(200, body, openmetrics.CONTENT_TYPE_LATEST if self.open_metrics
                     else CONTENT_TYPE)

    def respond(self, status: int, body: bytes, content_type: str = "text/plain",
                head: bool = False) -> None:
        """Send the answer (to HEAD: the head alone, with the length the body would have)."""
        if self.closed:
            return
        self.renew()  # a fresh period to take the answer
        self.stop_reading()
        self.send((f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                   ).encode() + (b"" if head else body))


class MetricsServer(SideListener):
    """Serves ``/metrics`` from a control target's ``stats``, and ``/healthz`` and
    ``/readyz`` from its readiness, on the owner's loop."""

    def __init__(self, address: str, target: MetricsTarget, head_timeout: float = HEAD_TIMEOUT,
                 max_clients: int = MAX_CLIENTS, sock: socket.socket | None = None) -> None:
        """``sock``: one already listening (handed over in an upgrade), else ``address`` is
        bound."""
        self.address = address
        self.target = target
        self.head_timeout = head_timeout
        super().__init__(sock or bind_metrics(address), self._client, max_clients)

    def _client(self, sock: socket.socket, reactor: Reactor,
                on_close: Callable[[ServiceClient], None]) -> Scrape:
        return Scrape(sock, self.target, reactor, on_close, self.head_timeout)

    def attach(self, reactor: Reactor) -> None:
        super().attach(reactor)
        logger.info("metrics on http://%s/metrics", address_label(self.sock.getsockname()))


#: Families that come from the document itself rather than a declared figure.
DOCUMENT_FAMILIES = (("portside_accepting_paused", "gauge", "", "1 while accepting is paused."),
                     ("portside_draining", "gauge", "", "1 while draining (ctl drain)."))


def families_table() -> str:
    """Every exported family as a Markdown table, from the declarations (docs/metrics.md)."""
    rows: dict[str, list[str]] = {}
    sources: list[tuple[str, list[tuple[str, Figure]]]] = [
        ("listener", figures(ListenerStatistics)), ("outbound", figures(OutboundStatistics)),
        ("worker", [(name, declared) for name, declared in figures(WorkerStatistics)
                    if _numeric(declared)]),
        ("pool", list(POOL_FIGURES.items()))]
    for label, declared_figures in sources:
        for name, declared in declared_figures:
            if declared.kind not in ("counter", "gauge", "reasons", "histogram") \
                    or declared.metric == "":
                continue
            kind = "counter" if declared.kind == "reasons" else declared.kind
            family = metric_name(name, declared) + ("_total" if kind == "counter" else "")
            labels = [label, *(key for key, _ in declared.labels)]
            if declared.kind == "reasons":
                labels.append("reason")
            row = rows.setdefault(family, [f"`{family}`", kind, "", declared.help, ""])
            row[2] = ", ".join(dict.fromkeys([*filter(None, row[2].split(", ")), *labels]))
            if declared.deprecated is not None:
                row[4] = f"`portside_{declared.deprecated}" + \
                    ("_total`" if kind == "counter" else "`")
    for gauge, gauge_kind, gauge_labels, help_text in DOCUMENT_FAMILIES:
        rows[gauge] = [f"`{gauge}`", gauge_kind, gauge_labels, help_text, ""]
    lines = ["| Family | Type | Labels | What | Former name (deprecated) |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell or "" for cell in row) + " |" for row in rows.values()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(families_table(), end="")
