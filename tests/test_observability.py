"""Prometheus metrics (scraped for real) and ``portside top``, against real processes."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from proc import PortsideProcess, echo_once
from prometheus_client.parser import text_string_to_metric_families

WAIT = 20.0


@pytest.fixture(params=[None, "2"], ids=["single", "workers"])
def observed(request: pytest.FixtureRequest,
             tmp_path: Path) -> Iterator[tuple[PortsideProcess, Path, dict[str, int], int]]:
    control = tmp_path / "ctl"
    workers = ["--workers", request.param] if request.param else []
    proc = PortsideProcess(["echo", "--data-first-port", "0", "--immediate-port", "0",
                            "--defer-accept", "0", "--metrics", "127.0.0.1:0",
                            "--control", str(control), *workers])
    try:
        ports = proc.ports()
        metrics_port = int(proc.wait_for(r"metrics on http://127.0.0.1:(\d+)/metrics",
                                         seen_too=True).group(1))
        for _ in range(2 if request.param else 0):
            proc.wait_for("started worker", seen_too=True)
        yield proc, control, ports, metrics_port
    finally:
        proc.kill()


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response.status, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found




def test_metrics_count_what_happened(
        observed: tuple[PortsideProcess, Path, dict[str, int], int]) -> None:
    _, _, ports, metrics_port = observed
    for i in range(7):
        assert echo_once(ports["immediate"], b"x" * (i + 1)) == b"x" * (i + 1)
    assert echo_once(ports["data-first"], b"first") == b"first"
    status, text = scrape(metrics_port)
    assert status == 200
    found = samples(text)
    immediate = (("listener", "immediate"),)
    assert found[("portside_connections_accepted_total", immediate)] == 7
    assert found[("portside_received_bytes_total", immediate)] == sum(range(1, 8))
    assert found[("portside_connections_accepted_total", (("listener", "data-first"),))] == 1
    assert found[("portside_time_to_first_byte_seconds_count", immediate)] == 7
    assert found[("portside_timeouts_total", (("kind", "idle"), ("listener", "immediate")))] == 0
    worker_gauges = [key for key in found if key[0] == "portside_worker_connections"]
    assert len(worker_gauges) >= 1
    assert ("portside_pool_hits_total", (("pool", "buffers"),)) in found
    assert scrape(metrics_port, "/nothing")[0] == 404


def test_top_once_shows_listeners_and_workers(
        observed: tuple[PortsideProcess, Path, dict[str, int], int]) -> None:
    _, control, ports, _ = observed
    assert echo_once(ports["immediate"], b"hello") == b"hello"
    done = subprocess.run([sys.executable, "-m", "portside", "top", "--control", str(control),
                           "--once"], capture_output=True, text=True, timeout=WAIT,
                          env={**os.environ, "COLUMNS": "200"}, check=True)
    assert "immediate" in done.stdout and "data-first" in done.stdout
    assert "worker pid" in done.stdout
    rows = [line for line in done.stdout.splitlines() if "immediate" in line]
    assert rows and " 1 " in rows[0]  # one connection accepted


def test_top_refreshes_then_stops(
        observed: tuple[PortsideProcess, Path, dict[str, int], int]) -> None:
    _, control, _, _ = observed
    done = subprocess.run([sys.executable, "-m", "portside", "top", "--control", str(control),
                           "--interval", "0.2", "--iterations", "2"], capture_output=True,
                          text=True, timeout=WAIT, env={**os.environ, "COLUMNS": "200"},
                          check=True)
    assert "conn/s" in done.stdout


def test_top_without_a_server(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "portside", "top", "--control",
                           str(tmp_path / "none"), "--once"], capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 1 and "no portside server" in done.stdout + done.stderr
