"""Smoke test of the benchmark harness: ``python -m bench --quick`` runs end to end.

It checks that the harness works (files written, every figure measured and non-zero, every
echoed byte correct), never how fast anything is: a benchmark is not a timed test.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]

NO_COMPILER = shutil.which("gcc") is None and shutil.which("cc") is None

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the harness needs Linux"),
    # On a developer's machine a missing compiler skips; in CI it fails (test below), so the
    # harness is never quietly left untested.
    pytest.mark.skipif(NO_COMPILER and not IN_CI,
                       reason="the harness compiles its load generator with gcc"),
    pytest.mark.timeout(360),  # the module's quick run (about 10-30 s) included
]


def test_ci_has_a_c_compiler() -> None:
    assert not NO_COMPILER, "no gcc or cc in CI: scripts/test installs gcc"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    results = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--results-dir",
                           str(results)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    document: dict[str, Any] = json.loads((results / "quick-latest.json").read_text())
    return results, document


def test_writes_markdown_json_and_latest_copies(quick_run: tuple[Path, dict[str, Any]]) -> None:
    results, document = quick_run
    stamp = document["stamp"]
    assert stamp.endswith("-quick")  # a smoke run is named as one...
    for name in (f"{stamp}.md", f"{stamp}.json", "quick-latest.md", "quick-latest.json"):
        assert (results / name).stat().st_size > 0, name
    assert not list(results.glob("latest.*"))  # ...and never replaces a real run's copies
    if importlib.util.find_spec("matplotlib") is not None:
        for name in (f"{stamp}.png", "quick-latest.png"):
            assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    markdown = (results / "quick-latest.md").read_text()
    assert "PASS/MISS" in markdown
    assert "quick smoke run" in markdown.splitlines()[0]
    assert document["machine"]["cores"] >= 1
    assert document["commit"]["commit"]


def test_every_figure_measured_without_failures(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, document = quick_run
    assert document["failures"] == []
    servers: list[str] = document["plan"]["servers"]
    scenarios: list[str] = document["plan"]["scenarios"]
    medians: dict[str, dict[str, float]] = document["medians"]
    assert servers and scenarios
    for server in servers:
        figures = medians[server]
        for key in ("a.req_s", "a.req_cpu_s", "a.p99_us", "b.req_s", "c.conn_s", "c.p99_us"):
            if key.split(".")[0] in scenarios:
                assert figures[key] > 0, (server, key)
        for scenario in ("a", "b", "c"):
            if scenario in scenarios:
                assert figures[f"{scenario}.failures"] == 0, (server, scenario)
        for scenario in (s for s in scenarios if s.startswith("d")):
            assert figures[f"{scenario}.held"] == int(scenario[1:]), (server, scenario)
            assert f"{scenario}.rss_per_conn_b" in figures
            if not server.startswith("c_"):  # a C server's idle connections cost no RSS
                assert figures[f"{scenario}.rss_per_conn_b"] > 0, (server, scenario)
        if "e" in scenarios and server.startswith("portside_"):
            assert figures["e.base_req_s"] > 0 and figures["e.attack_req_s"] > 0, server
            assert figures["e.failures"] == 0, server
    verdicts = {target["verdict"] for target in document["targets"]}
    assert verdicts <= {"PASS", "MISS", "n/a"}
    assert "n/a" not in verdicts  # every target had both its figures


def test_relay_scenario_runs_side_by_side_with_haproxy(tmp_path: Path) -> None:
    """(r): portside's relay and HAProxy (mode tcp), each relaying to the C echo server, in
    one quick run: both measured, no failure, every echoed byte checked by the loadgen."""
    if shutil.which("haproxy") is None:
        if IN_CI:
            pytest.fail("haproxy is missing in CI (scripts/test installs it)")
        pytest.skip("haproxy is missing (scripts/test installs it)")
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--servers",
                           "relay_portside,relay_haproxy", "--scenarios", "r",
                           "--results-dir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    document: dict[str, Any] = json.loads((tmp_path / "quick-latest.json").read_text())
    assert document["failures"] == []
    for server in ("relay_portside", "relay_haproxy"):
        figures = document["medians"][server]
        assert figures["r.req_s"] > 0 and figures["r.req_cpu_s"] > 0, server
        assert figures["r.failures"] == 0, server
    assert "r.req_cpu_s" in document["ratios"]["relay_haproxy"]["relay_portside"]
    assert "vs HAProxy" in (tmp_path / "quick-latest.md").read_text()


def test_baseline_unpacks_an_earlier_commit_and_registers_its_server(tmp_path: Path) -> None:
    """``--baseline REV``: the tree of REV, whole, beside this one; an unknown REV is one
    clear error, not a traceback."""
    from bench import baseline
    from bench.servers import SERVERS

    name = baseline.add("HEAD", build=tmp_path)
    try:
        spec = SERVERS[name]
        assert name.startswith("portside_epoll@") and spec.tree is not None
        assert (spec.tree / "bench" / "servers" / "portside_echo.py").is_file()
        assert (spec.tree / "src" / "portside" / "engine" / "epoll.py").is_file()
        assert not list(tmp_path.glob("*.partial"))
        assert baseline.add("HEAD", build=tmp_path) == name  # unpacked once, reused
    finally:
        SERVERS.pop(name, None)
    with pytest.raises(baseline.BaselineError, match="rev-parse"):
        baseline.add("no-such-revision-here", build=tmp_path)
