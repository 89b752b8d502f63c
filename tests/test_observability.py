"""Prometheus metrics (scraped for real) and ``portside top``, against real processes; the
metrics endpoint's defences against silent and trickling scrapers."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
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
    assert found[("portside_received_bytes_total", immediate)] == sum(range(1, 8))
    assert found[("portside_sent_bytes_total", immediate)] == sum(range(1, 8))
    # The former names, kept as aliases for one release (docs/metrics.md).
    assert found[("portside_bytes_in_total", immediate)] == sum(range(1, 8))
    assert found[("portside_bytes_out_total", immediate)] == sum(range(1, 8))
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
    assert slots in ({"1"}, {"1", "2"})
    fds = worker_labels(found, "portside_process_open_fds")
    assert fds == slots | ({"supervisor"} if len(slots) == 2 else set())
    for slot in fds:
        worker = (("worker", slot),)
        assert 0 < found[("portside_process_open_fds", worker)] < \
            found[("portside_process_max_fds", worker)]
        assert found[("portside_process_resident_memory_bytes", worker)] > 1 << 20
        assert found[("portside_process_cpu_seconds_total", worker)] > 0  # it ran Python
    assert scrape(metrics_port, "/nothing")[0] == 404


def test_healthz_and_readyz_follow_pause_and_drain(observed: Observed) -> None:
    """/healthz: alive; /readyz: 200 while new connections are welcome, 503 once paused or
    from the moment draining starts (while /healthz stays 200 and the drain goes on)."""
    proc, control, ports, metrics_port = observed
    assert scrape(metrics_port, "/healthz")[:2] == (200, "ok\n")
    if "--workers" in proc.proc.args:  # type: ignore[operator]
        proc.wait_for(r"with 2 worker\(s\)", seen_too=True)  # ready once every worker serves
    assert scrape(metrics_port, "/readyz")[:2] == (200, "ok\n")
    head = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=WAIT)
    head.request("HEAD", "/readyz")
    response = head.getresponse()
    assert response.status == 200 and response.read() == b""
    head.close()
    _ctl_json(control, "pause")
    assert scrape(metrics_port, "/readyz")[:2] == (503, "not ready: paused\n")
    _ctl_json(control, "resume")
    assert scrape(metrics_port, "/readyz")[0] == 200
    _ctl_json(control, "drain")
    assert scrape(metrics_port, "/readyz")[:2] == (503, "not ready: draining\n")
    _ctl_json(control, "resume")
    assert scrape(metrics_port, "/readyz")[0] == 200
    held = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
    held.sendall(b"x")
    assert held.recv(1) == b"x"
    proc.signal(signal.SIGTERM)
    proc.wait_for(r"draining 1 connection")
    assert scrape(metrics_port, "/readyz")[:2] == (503, "not ready: draining\n")
    assert scrape(metrics_port, "/healthz")[0] == 200
    held.sendall(b"y")  # still served while draining
    assert held.recv(1) == b"y"
    held.close()
    assert proc.wait_exit() == 0


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
            proc.wait_for(rf"\(pid {pid}\) stopped", seen_too=True)
        after = worker_labels(samples(scrape(port)[1]), "portside_worker_uptime_seconds")
        assert before == after == {"1", "2"}
        assert str(old[0]) not in scrape(port)[1]  # no pid in any label
    finally:
        proc.kill()


# -- the endpoint cannot be locked out -------------------------------------------------------------


class _Stats:
    """A control target with a fixed, tiny stats document."""

    def readiness(self) -> str | None:
        return None

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


# -- many workers, one truth -------------------------------------------------------------------


def _ctl_json(control: Path, command: str, *args: str) -> Any:
    import json

    done = subprocess.run([sys.executable, "-m", "portside", "ctl", "--json", "--control",
                           str(control), command, *args], capture_output=True, text=True,
                          timeout=WAIT, check=True)
    return json.loads(done.stdout)


def _accepted(control: Path, metrics_port: int) -> tuple[int, int, int]:
    """``accepted`` as metrics, ``ctl stats`` and ``top`` show it."""
    import json

    found = samples(scrape(metrics_port)[1])
    scraped = sum(value for (name, _), value in found.items()
                  if name == "portside_accepted_total")
    stats = _ctl_json(control, "stats")["totals"]["accepted"]
    top = json.loads(run_top(control, "--once", "--json").stdout)["stats"]["totals"]["accepted"]
    return int(scraped), stats, top


def test_counters_keep_what_ended_workers_counted_and_gauges_do_not(tmp_path: Path) -> None:
    """kill -9 of a worker and a reload (SIGHUP) replace workers: no counter goes backwards
    (Prometheus would read a drop as a reset of the whole server), while the open connections
    of a dead worker leave the gauges."""
    control = tmp_path / "ctl"
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--defer-accept", "0", "--metrics", "127.0.0.1:0", "--workers", "2",
                            "--control", str(control)])
    try:
        ports = proc.ports()
        metrics_port = int(proc.wait_for(r"metrics on http://127.0.0.1:(\d+)/metrics",
                                         seen_too=True).group(1))
        for _ in range(2):
            proc.wait_for(r"worker \d \(pid \d+\) is serving")
        for _ in range(20):
            assert echo_once(ports["immediate"]) == b"ping"
        held = socket.create_connection(("127.0.0.1", ports["immediate"]), timeout=WAIT)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        assert _accepted(control, metrics_port) == (21, 21, 21)
        stats = _ctl_json(control, "stats")
        assert stats["totals"]["active"] == 1
        bytes_in = stats["totals"]["bytes_in"]
        (entry,) = _ctl_json(control, "connections")["connections"]
        holder = int(entry["id"].split(".")[0])
        os.kill(holder, signal.SIGKILL)
        proc.wait_for(rf"\(pid {holder}\) died")
        proc.wait_for(r"worker \d \(pid \d+\) is serving")
        assert _accepted(control, metrics_port) == (21, 21, 21)
        stats = _ctl_json(control, "stats")
        assert stats["totals"]["active"] == 0  # the dead worker's connection is gone
        assert stats["totals"]["bytes_in"] == bytes_in
        found = samples(scrape(metrics_port)[1])
        assert found[("portside_connections", (("listener", "immediate"),
                                               ("state", "active")))] == 0
        held.close()
        for _ in range(5):
            assert echo_once(ports["immediate"]) == b"ping"
        assert _accepted(control, metrics_port) == (26, 26, 26)
        old = [worker["pid"] for worker in _ctl_json(control, "stats")["workers"]]
        proc.signal(signal.SIGHUP)
        for pid in old:
            proc.wait_for(rf"\(pid {pid}\) stopped", seen_too=True)
        proc.wait_for("reload complete", seen_too=True)
        assert _accepted(control, metrics_port) == (26, 26, 26)
        assert _ctl_json(control, "stats")["totals"]["bytes_in"] == bytes_in + 5 * 4
    finally:
        proc.kill()


def test_one_worker_numbering_in_logs_ctl_top_and_metrics(tmp_path: Path) -> None:
    """The number in a worker's log lines (text and JSON), the supervisor's lines about it,
    ``ctl stats``, ``top`` and the metrics' ``worker`` label are one and the same."""
    import json

    control = tmp_path / "ctl"
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--metrics", "127.0.0.1:0", "--workers", "2", "--log-format", "json",
                            "--control", str(control)])
    try:
        metrics_port = int(json.loads(proc.wait_for(r"metrics on http://").string)[
            "message"].rsplit(":", 1)[1].split("/")[0])
        supervisor_says = {}
        for _ in range(2):
            line = json.loads(proc.wait_for(r"is serving").string)
            number, pid = re.fullmatch(r"worker (\d) \(pid (\d+)\) is serving",
                                       line["message"]).groups()  # type: ignore[union-attr]
            supervisor_says[int(pid)] = number
        proc.wait_for("serving .* with 2 worker")
        workers_say = {}
        for line in proc.lines:
            document = json.loads(line)
            if document["worker"] is not None:
                workers_say[document["pid"]] = str(document["worker"])
        stats = _ctl_json(control, "stats")
        ctl_says = {process["pid"]: process["slot"] for process in stats["workers"]}
        top = json.loads(run_top(control, "--once", "--json").stdout)["stats"]
        top_says = {process["pid"]: process["slot"] for process in top["workers"]}
        assert supervisor_says == workers_say == ctl_says == top_says
        assert set(ctl_says.values()) == {"1", "2"}
        found = samples(scrape(metrics_port)[1])
        assert worker_labels(found, "portside_worker_connections") == {"1", "2"}
    finally:
        proc.kill()


class _Logged(PortsideProcess):
    """Any command, its stderr read line by line as ``PortsideProcess`` reads portside's."""

    def __init__(self, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        import queue

        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)
        self.lines = []
        self._queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def test_haproxy_httpchk_on_readyz_takes_a_draining_instance_out(tmp_path: Path) -> None:
    """The deployment guide's check, with a real HAProxy: ``option httpchk`` on /readyz marks
    the instance DOWN once it drains (``ctl drain``: nothing refused yet), UP again after
    ``ctl resume``."""
    import shutil

    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    control = tmp_path / "ctl"
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--metrics", "127.0.0.1:0", "--workers", "2",
                            "--control", str(control)])
    balancer = None
    front = socket.socket()
    try:
        front.bind(("127.0.0.1", 0))
        front.listen(16)
        ports = proc.ports()
        metrics = int(proc.wait_for(r"metrics on http://127.0.0.1:(\d+)/", seen_too=True)
                      .group(1))
        proc.wait_for(r"with 2 worker\(s\)")
        config = tmp_path / "haproxy.cfg"
        config.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check 5s
frontend front
    bind fd@{front.fileno()}
    default_backend portside
backend portside
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    server one 127.0.0.1:{ports["immediate"]} check port {metrics} inter 100ms fall 1 rise 1
""")
        balancer = _Logged([haproxy, "-f", str(config), "-db"], pass_fds=(front.fileno(),))
        _ctl_json(control, "drain")
        balancer.wait_for(r"Server portside/one is DOWN.*503")
        _ctl_json(control, "resume")
        balancer.wait_for(r"Server portside/one is UP")
    finally:
        if balancer is not None:
            balancer.kill()
        front.close()
        proc.kill()
