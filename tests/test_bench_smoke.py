"""Smoke test of the benchmark harness: ``python -m bench --quick`` runs end to end.

It checks that the harness works (files written, every figure measured and non-zero, every
echoed byte correct, over TLS too), never how fast anything is: a benchmark is not a timed test.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI

REPO = Path(__file__).resolve().parents[1]

NO_COMPILER = shutil.which("gcc") is None and shutil.which("cc") is None
TLS_SCENARIOS = ("t64", "t4k", "hfull", "hresume")

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


def test_ci_has_openssl_for_the_tls_scenarios() -> None:
    """The load generator links OpenSSL (libssl-dev) and the run makes its certificate with
    the openssl command: both are there (scripts/test installs them)."""
    assert shutil.which("openssl"), "no openssl command: scripts/test installs openssl"
    assert any(Path(d, "openssl", "ssl.h").is_file() for d in (
        "/usr/include", "/usr/local/include")), "no OpenSSL headers: install libssl-dev"


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
    # A smoke run gives no verdict: its targets table says so, and has no PASS/MISS column.
    assert "PASS/MISS" not in markdown and "| PASS |" not in markdown
    assert "## Targets (smoke run: no verdict)" in markdown
    assert "quick smoke run" in markdown.splitlines()[0]
    assert "seed" in markdown and document["plan"]["seed"] == int(
        re.search(r"seed (\d+)", markdown).group(1))  # type: ignore[union-attr]
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
        tls = server in ("uvloop_proto", "asyncio_proto", "portside_compiled", "portside_epoll")
        for scenario in TLS_SCENARIOS:
            assert scenario in scenarios  # the default run measures TLS too
            if not tls:  # the C server speaks no TLS: no figure, not a 0
                assert not any(key.startswith(f"{scenario}.") for key in figures), server
                continue
            assert figures[f"{scenario}.failures"] == 0, (server, scenario)
            unit = "req" if scenario.startswith("t") else "conn"
            assert figures[f"{scenario}.{unit}_s"] > 0, (server, scenario)
            assert figures[f"{scenario}.{unit}_cpu_s"] > 0, (server, scenario)
        if tls:
            assert figures["t4k.mb_s"] > 0, server
            assert figures["hfull.resumed_share"] == 0, server  # no session offered
            # Most handshakes resumed (each slot's first may not: it has no ticket yet).
            assert figures["hresume.resumed_share"] > 0.5, server
        for scenario in (s for s in scenarios if s.startswith("d")):
            assert figures[f"{scenario}.held"] == int(scenario[1:]), (server, scenario)
            if server == "c_epoll":  # no user-space state per connection: n/a, not 0
                assert f"{scenario}.rss_per_conn_b" not in figures
            else:
                assert figures[f"{scenario}.rss_per_conn_b"] > 0, (server, scenario)
        if "e" in scenarios and server.startswith("portside_"):
            assert figures["e.base_req_s"] > 0 and figures["e.attack_req_s"] > 0, server
            assert figures["e.failures"] == 0, server
            # The defence worked during the attack: the server closed silent connections.
            assert figures["e.silent_closed"] > 0, server
    verdicts = {target["verdict"] for target in document["targets"]}
    assert verdicts == {"smoke"}  # every target had both its figures, and none is judged
    assert all(len(target["rounds"]) == 1 for target in document["targets"])
    assert sorted(document["orders"][0]) == sorted(servers)


def test_relay_scenario_runs_side_by_side_with_haproxy(tmp_path: Path) -> None:
    """(r) and (rt): portside's relay and HAProxy (mode tcp; ``ssl crt`` on its bind line in
    rt), each relaying to the C echo server, in one quick run: both measured, no failure,
    every echoed byte checked by the loadgen; rt's target held by portside's relay."""
    if shutil.which("haproxy") is None:
        if IN_CI:
            pytest.fail("haproxy is missing in CI (scripts/test installs it)")
        pytest.skip("haproxy is missing (scripts/test installs it)")
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--servers",
                           "relay_portside,relay_haproxy", "--scenarios", "r,rt",
                           "--results-dir", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    document: dict[str, Any] = json.loads((tmp_path / "quick-latest.json").read_text())
    assert document["failures"] == []
    for server in ("relay_portside", "relay_haproxy"):
        figures = document["medians"][server]
        for scenario in ("r", "rt"):
            assert figures[f"{scenario}.req_s"] > 0, (server, scenario)
            assert figures[f"{scenario}.req_cpu_s"] > 0, (server, scenario)
            assert figures[f"{scenario}.failures"] == 0, (server, scenario)
    for key in ("r.req_cpu_s", "rt.req_cpu_s"):
        assert key in document["ratios"]["relay_haproxy"]["relay_portside"]
    (target,) = [t for t in document["targets"] if t["figure"] == "rt.req_cpu_s"]
    assert target["server"] == "relay_portside" and target["verdict"] == "smoke"
    markdown = (tmp_path / "quick-latest.md").read_text()
    assert "vs HAProxy" in markdown


def test_tls_loadgen_fails_clearly_against_a_plain_server() -> None:
    """A TLS load generator pointed at a plain echo server (which echoes the ClientHello)
    ends in time and reports failed handshakes, never a completed request."""
    from bench.build import build
    from bench.loadgen import Loadgen, LoadgenReport
    from bench.servers import SERVERS

    source = SERVERS["c_epoll"].c_source
    assert source is not None
    server = subprocess.Popen([str(build(source)), "--port", "0", "--max-seconds", "30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        loadgen = Loadgen.build(cpu=None, connect_timeout=5.0, source_addresses=4)
        report: LoadgenReport = loadgen.run("short", port, 4, 64, 0.3, tls=True)
        assert report.completed == 0 and report.tls == 1
        assert report.tls_errors > 0 and report.failures >= report.tls_errors
    finally:
        server.terminate()  # our own child, by its handle
        server.wait(timeout=10)


def test_tls_cost_target_is_own_a_over_own_t64() -> None:
    """'portside's TLS costs at most 2x its plain (a) per request': per round, the server's
    a.req_cpu_s over its t64.req_cpu_s, against nobody else's figure."""
    from bench.results import Measurement, RunResult

    result = RunResult(("uvloop_proto", "portside_compiled"), ("a", "t64"), 2)
    for round_no, (plain, tls) in {1: (300.0, 100.0), 2: (300.0, 200.0)}.items():
        result.measurements += [
            Measurement("portside_compiled", "a", round_no, {"req_cpu_s": plain}),
            Measurement("portside_compiled", "t64", round_no, {"req_cpu_s": tls}),
            Measurement("uvloop_proto", "a", round_no, {"req_cpu_s": 1.0}),
            Measurement("uvloop_proto", "t64", round_no, {"req_cpu_s": 1.0})]
    (cost,) = [t for t in result.target_results() if t.target.own == "a.req_cpu_s"]
    assert cost.server == "portside_compiled" and cost.rounds == (3.0, 1.5)
    assert cost.rounds_met == 1 and cost.verdict == "MISS"  # median 2.25 > 2
    assert cost.target.requirement() == "cost per request <= 2x its own a.req_cpu_s"


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


# -- the harness's bookkeeping, without a run ---------------------------------------------------


def test_dirty_paths_keep_every_character() -> None:
    """``git status --porcelain -z``: the first path keeps its first letter (a leading space
    is part of the status), renames name their new path, results files do not count."""
    from bench.machine import dirty_paths

    status = " M src/portside/engine/epoll.py\0M  bench/report.py\0R  new.py\0old.py\0" \
        "?? bench/results/20260101-000000.md\0?? notes.txt\0"
    assert dirty_paths(status) == ["src/portside/engine/epoll.py", "bench/report.py", "new.py",
                                   "notes.txt"]
    assert dirty_paths("") == []


def test_server_order_is_shuffled_per_round_and_seeded() -> None:
    from bench.plan import Plan

    servers = ("c_epoll", "uvloop_proto", "portside_compiled", "portside_epoll", "asyncio_proto")
    plan = Plan(servers=servers, scenarios=("a",), rounds=6, seconds=1, warmup=1, quick=False,
                seed=1234)
    orders = plan.server_orders()
    assert all(sorted(order) == sorted(servers) for order in orders)
    assert len(set(orders)) > 1  # not the same order every round
    assert len({order[0] for order in orders}) > 1  # not the same server first every round
    assert orders == plan.server_orders()  # the seed repeats it


def _result(values: dict[int, tuple[float, float]]) -> Any:
    """(a) for portside_compiled and c_epoll, per round: req/CPU-s of each."""
    from bench.results import Measurement, RunResult

    result = RunResult(("c_epoll", "portside_compiled"), ("a",), len(values))
    for round_no, (ours, c) in values.items():
        result.measurements.append(Measurement("portside_compiled", "a", round_no,
                                               {"req_cpu_s": ours}))
        result.measurements.append(Measurement("c_epoll", "a", round_no, {"req_cpu_s": c}))
    return result


def test_targets_report_spread_and_rounds_met() -> None:
    """Two rounds of three below 0.95x C while the median passes: the report shows it."""
    result = _result({1: (90.0, 100.0), 2: (99.0, 100.0), 3: (93.0, 100.0)})
    (vs_c,) = [t for t in result.target_results() if t.target.reference == "c_epoll"]
    assert vs_c.rounds == (0.9, 0.99, 0.93) and vs_c.rounds_met == 1
    assert vs_c.verdict == "MISS"
    result = _result({1: (96.0, 100.0), 2: (99.0, 100.0), 3: (93.0, 100.0)})
    (vs_c,) = [t for t in result.target_results() if t.target.reference == "c_epoll"]
    assert vs_c.verdict == "PASS" and vs_c.rounds_met == 2
    from bench.report import _targets_section

    lines = "\n".join(_targets_section(result))
    assert "0.93 to 0.99" in lines and "| 2/3 |" in lines and "PASS" in lines
    result.smoke = True
    assert {t.verdict for t in result.target_results() if t.ratio is not None} == {"smoke"}
    assert "PASS" not in "\n".join(_targets_section(result))


def _context(tmp_path: Path, dirty: list[str], allow_dirty: bool = False,
             quick: bool = False) -> Any:
    from bench.plan import Plan
    from bench.report import Context

    plan = Plan(servers=("c_epoll", "portside_compiled"), scenarios=("a",), rounds=3, seconds=1,
                warmup=1, quick=quick, seed=7, defer_accept=0)
    machine = {"cores": 2, "cpu_model": "x", "memory_gib": 1, "kernel": "k", "python": "3",
               "loop": {"uvloop": "0"}, "compiler": "gcc", "loadavg_at_start": "0",
               "pinning": {"server_cpu": 1, "loadgen_cpu": 0}}
    commit = {"commit": "abc", "short": "abc", "subject": "s", "dirty": dirty}
    return Context("20260101-000000" + ("-quick" if quick else ""), plan, machine, commit, None,
                   allow_dirty=allow_dirty)


def test_a_dirty_tree_never_becomes_latest_unless_allowed_and_then_says_so(
        tmp_path: Path) -> None:
    from bench.report import write

    result = _result({1: (96.0, 100.0)})
    written = write(result, _context(tmp_path, ["src/portside/engine/epoll.py"]), tmp_path)
    assert [path.name for path in written] == ["20260101-000000.md", "20260101-000000.json"]
    assert not list(tmp_path.glob("latest.*"))
    assert "DIRTY TREE" in (tmp_path / "20260101-000000.md").read_text().splitlines()[0]
    write(result, _context(tmp_path, ["x.py"], allow_dirty=True), tmp_path)
    assert "DIRTY TREE" in (tmp_path / "latest.md").read_text().splitlines()[0]
    clean = tmp_path / "clean"
    write(result, _context(clean, []), clean)
    assert "DIRTY" not in (clean / "latest.md").read_text()


def test_the_method_line_calls_only_the_real_default_the_default(tmp_path: Path) -> None:
    from bench.report import markdown

    text = markdown(_result({1: (96.0, 100.0)}), _context(tmp_path, []))  # defer_accept=0
    assert "portside's default TCP_DEFER_ACCEPT (0 s)" not in text
    assert "TCP_DEFER_ACCEPT off (0 s) (--defer-accept; portside's default is 1 s)" in text
    assert "first-data timeout of 1 s" in text and "seed 7" in text
