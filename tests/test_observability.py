"""Prometheus metrics (scraped for real) and ``portside top``, against real processes; the
metrics endpoint's defences against silent and trickling scrapers."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ALL_ENGINES, HAVE_COMPILED, HAVE_UVLOOP, assert_on_time, join, require
from proc import PortsideProcess, echo_once
from prometheus_client.parser import text_string_to_metric_families

from portside.control import protocol
from portside.engine.epoll import EpollReactor
from portside.metrics import MetricsServer

WAIT = 20.0

Observed = tuple[PortsideProcess, Path, dict[str, int], int]


#: The process-level metrics on every engine in one process, and with workers on the default
#: engine (workers run the same engine code as a single process: one more engine there would
#: only repeat the supervisor's merge, tested below and in test_control_socket).
OBSERVED = [pytest.param((None, engine), id=f"single-{engine}") for engine in ALL_ENGINES] + \
    [pytest.param(("2", None), id="workers")]


#: What is the same on every engine (the exposition format, top) runs on the default engine.
DEFAULT_ENGINE_ONLY = [pytest.param((None, None), id="single"),
                       pytest.param(("2", None), id="workers")]


@pytest.fixture(params=OBSERVED)
def observed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Observed]:
    workers_count, engine = request.param
    if engine == "uvloop":
        require(HAVE_UVLOOP, "uvloop (the uvloop engine)")
    if engine == "compiled":
        require(HAVE_COMPILED, "the compiled engine")
    control = tmp_path / "ctl"
    workers = ["--workers", workers_count] if workers_count else []
    engines = ["--engine", engine] if engine else []
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--defer-accept", "0", "--metrics", "127.0.0.1:0",
                            "--first-data-timeout", "0.3",
                            "--control", str(control), *workers, *engines])
    try:
        ports = proc.ports()
        metrics_port = int(proc.wait_for(r"metrics on http://127.0.0.1:(\d+)/metrics",
                                         seen_too=True).group(1))
        for _ in range(2 if workers_count else 0):
            proc.wait_for("started worker", seen_too=True)
        yield proc, control, ports, metrics_port
    finally:
        proc.kill()


def scrape(port: int, path: str = "/metrics",
           headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response.status, body, response.getheader("Content-Type") or ""


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def worker_labels(found: Samples, name: str) -> set[str]:
    return {dict(labels)["worker"] for metric, labels in found if metric == name}


def test_metrics_count_what_happened(observed: Observed) -> None:
    _, _, ports, metrics_port = observed
    for i in range(7):
        assert echo_once(ports["immediate"], b"x" * (i + 1)) == b"x" * (i + 1)
    assert echo_once(ports["data-first"], b"first") == b"first"
    with socket.create_connection(("127.0.0.1", ports["data-first"]), timeout=WAIT) as silent, \
            pytest.raises(ConnectionResetError):  # closed by the first-data deadline
        silent.recv(10)
    status, text, content_type = scrape(metrics_port)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    found = samples(text)
    immediate = (("listener", "immediate"),)
    first = (("listener", "data-first"),)
    assert found[("portside_accepted_total", immediate)] == 7
    assert found[("portside_bytes_in_total", immediate)] == sum(range(1, 8))
    assert found[("portside_accepted_total", first)] == 2
    assert found[("portside_time_to_first_byte_seconds_count", immediate)] == 7
    assert found[("portside_timeouts_total", (("kind", "first_data"), *first))] == 1
    assert found[("portside_timeouts_total", (("kind", "idle"), *immediate))] == 0
    assert found[("portside_closed_total", (*first, ("reason", "first-data-timeout")))] == 1
    assert sum(value for (name, labels), value in found.items()
               if name == "portside_closed_total" and ("listener", "immediate") in labels) == 7
    assert found[("portside_max_connections", immediate)] >= 10_000
    assert found[("portside_listener_accepting", immediate)] == 1
    pool = (("pool", "buffers"),)  # every read took a buffer: from the pool or made anew
    assert found[("portside_pool_hits_total", pool)] + \
        found[("portside_pool_misses_total", pool)] >= 8
    slots = worker_labels(found, "portside_worker_connections")
    assert slots in ({"0"}, {"0", "1"})
    fds = worker_labels(found, "portside_process_open_fds")
    assert fds == slots | ({"supervisor"} if len(slots) == 2 else set())
    for slot in fds:
        worker = (("worker", slot),)
        assert 0 < found[("portside_process_open_fds", worker)] < \
            found[("portside_process_max_fds", worker)]
        assert found[("portside_process_resident_memory_bytes", worker)] > 1 << 20
        assert found[("portside_process_cpu_seconds_total", worker)] > 0  # it ran Python
    assert scrape(metrics_port, "/nothing")[0] == 404


@pytest.mark.parametrize("observed", DEFAULT_ENGINE_ONLY, indirect=True)
def test_openmetrics_when_the_scraper_asks(observed: Observed) -> None:
    _, _, ports, metrics_port = observed
    assert echo_once(ports["immediate"]) == b"ping"
    status, text, content_type = scrape(metrics_port, headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert 'portside_accepted_total{listener="immediate"} 1.0' in text


def test_pausing_one_listener_shows_in_its_gauge(observed: Observed) -> None:
    _, control, _, metrics_port = observed
    subprocess.run([sys.executable, "-m", "portside", "ctl", "--control", str(control),
                    "pause", "immediate"], check=True, timeout=WAIT, capture_output=True)
    found = samples(scrape(metrics_port)[1])
    assert found[("portside_listener_accepting", (("listener", "immediate"),))] == 0
    assert found[("portside_listener_accepting", (("listener", "data-first"),))] == 1


def test_worker_series_keep_their_slot_across_a_restart(tmp_path: Path) -> None:
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--metrics", "127.0.0.1:0", "--workers", "2", "--control",
                            str(tmp_path / "ctl")])
    try:
        proc.ports()
        port = int(proc.wait_for(r"metrics on http://127.0.0.1:(\d+)/metrics",
                                 seen_too=True).group(1))
        old = [int(proc.wait_for(r"started worker \d+ \(pid (\d+)\)").group(1)) for _ in "ab"]
        before = worker_labels(samples(scrape(port)[1]), "portside_worker_uptime_seconds")
        proc.signal(signal.SIGHUP)
        for pid in old:
            proc.wait_for(rf"worker {pid} stopped", seen_too=True)
        after = worker_labels(samples(scrape(port)[1]), "portside_worker_uptime_seconds")
        assert before == after == {"0", "1"}
        assert str(old[0]) not in scrape(port)[1]  # no pid in any label
    finally:
        proc.kill()


# -- the endpoint cannot be locked out -------------------------------------------------------------


class _Stats:
    """A control target with a fixed, tiny stats document."""

    def control(self, request: protocol.Request, respond: Any) -> None:
        respond(protocol.reply_ok({
            "listeners": [], "workers": [], "supervisor": None, "pools": {},
            "accepting_paused": False}))


@contextlib.contextmanager
def metrics_endpoint(head_timeout: float) -> Iterator[int]:
    """A MetricsServer keeping 16 clients on portside's epoll loop in a thread; its port."""
    reactor = EpollReactor()
    server = MetricsServer("127.0.0.1:0", _Stats(), head_timeout=head_timeout, max_clients=16)
    server.attach(reactor)
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    try:
        yield int(server.sock.getsockname()[1])
    finally:
        reactor.call_soon_threadsafe(reactor.stop)
        join(thread, WAIT)
        server.close()
        reactor.close()


@pytest.fixture
def endpoint() -> Iterator[int]:
    """With a 0.8 s head deadline, to see it fire."""
    with metrics_endpoint(0.8) as port:
        yield port


@pytest.fixture
def patient_endpoint() -> Iterator[int]:
    """With a 10 s head deadline: whatever gets through sooner did so without its help."""
    with metrics_endpoint(10.0) as port:
        yield port


def test_a_silent_scraper_is_cut_off_on_time(endpoint: int) -> None:
    with socket.create_connection(("127.0.0.1", endpoint), timeout=WAIT) as sock:
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408")
    assert_on_time(waited, 0.8)  # neither early nor late


def test_a_slow_but_timely_scraper_is_answered(endpoint: int) -> None:
    with socket.create_connection(("127.0.0.1", endpoint), timeout=WAIT) as sock:
        for piece in (b"GET /metr", b"ics HTTP/1.1\r\n", b"Host: x\r\n\r\n"):
            time.sleep(0.05)  # the scraper's own pace: 0.15 s in all, inside the 0.8 s
            sock.sendall(piece)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")


def test_bytes_after_the_request_are_not_read(endpoint: int) -> None:
    with socket.create_connection(("127.0.0.1", endpoint), timeout=WAIT) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n" + b"z" * 100_000)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b"portside_draining 0.0" in answer


def test_silent_and_trickling_scrapers_cannot_lock_out_a_real_scrape(
        patient_endpoint: int) -> None:
    endpoint = patient_endpoint
    held: list[socket.socket] = []
    stop = threading.Event()

    def trickle(socks: list[socket.socket]) -> None:
        while not stop.wait(0.05):  # one byte each, never a whole head; ends with the test
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"X")

    try:
        for _ in range(60):  # far more than the 16 the endpoint keeps
            held.append(socket.create_connection(("127.0.0.1", endpoint), timeout=WAIT))
        trickling = held[::2]
        for sock in trickling:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        thread = threading.Thread(target=trickle, args=(trickling,), daemon=True)
        thread.start()
        for _ in range(3):
            started = time.monotonic()
            status, text, _ = scrape(endpoint)
            assert status == 200 and "portside_accepting_paused" in text
            assert time.monotonic() - started < 5.0  # long before any head deadline could help
        stop.set()
        join(thread, WAIT)
    finally:
        stop.set()
        for sock in held:
            sock.close()


# -- portside top ----------------------------------------------------------------------------------


def run_top(control: Path, *args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portside", "top", "--control", str(control),
                           *args], capture_output=True, text=True, timeout=WAIT,
                          env={**os.environ, "COLUMNS": str(columns)}, check=True)


@pytest.mark.parametrize("observed", DEFAULT_ENGINE_ONLY, indirect=True)
def test_top_once_shows_listeners_workers_and_connections(observed: Observed) -> None:
    _, control, ports, _ = observed
    assert echo_once(ports["immediate"], b"hello") == b"hello"
    with socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        out = run_top(control, "--once").stdout
        port = held.getsockname()[1]
    assert "immediate" in out and "data-first" in out and "accepting" in out
    assert "worker" in out and "limit" in out and "peak" in out
    assert f"127.0.0.1:{port}" in out and "connections: 1 of 1" in out
    for width in (80, 60, 40):
        narrow = run_top(control, "--once", columns=width).stdout
        assert "…" not in narrow
        assert all(len(line) <= width for line in narrow.splitlines()), narrow
        assert "immediate" in narrow


@pytest.mark.parametrize("observed", DEFAULT_ENGINE_ONLY, indirect=True)
def test_top_once_json(observed: Observed) -> None:
    import json

    _, control, _, _ = observed
    document = json.loads(run_top(control, "--once", "--json").stdout)
    assert {entry["name"] for entry in document["stats"]["listeners"]} == {"immediate",
                                                                           "data-first"}
    assert document["connections"]["total"] == 0


@pytest.mark.parametrize("observed", DEFAULT_ENGINE_ONLY, indirect=True)
def test_top_refreshes_then_stops(observed: Observed) -> None:
    _, control, _, _ = observed
    out = run_top(control, "--interval", "0.2", "--iterations", "2").stdout
    assert "conn/s" in out


def test_top_without_a_server(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "portside", "top", "--control",
                           str(tmp_path / "none"), "--once"], capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 1 and "no portside server" in done.stderr
    assert "Traceback" not in done.stderr
