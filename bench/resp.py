"""The RESP example beside a real Redis, under the same redis-benchmark load.

Starts ``portside resp`` (its default engine, the compiled one) and Debian's ``redis-server``
one after the other on loopback, each pinned to CPU 1, and drives each with
``redis-benchmark`` pinned to CPU 0: ``-t ping,set,get`` plain, pipelined (``-P 16``) and with
a new connection per request (``-k 0``). Medians of several rounds go to
``bench/results/resp-latest.md`` (and ``.json``).

    python -m bench.resp [--rounds 3] [--requests 100000] [--clients 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import commit, machine
from bench.procfs import (
    child_setup,
    children_cpu_seconds,
    cpu_seconds,
    host_busy_seconds,
    usable_cpus,
)

REPO = Path(__file__).resolve().parent.parent
MODES = {"plain": [], "pipelined -P 16": ["-P", "16"], "new connection per request -k 0":
         ["-k", "0"]}
TESTS = ("PING_INLINE", "PING_MBULK", "SET", "GET")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # a start-up probe, outside any measurement
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def start(server: str, port: int, cpu: int | None) -> subprocess.Popen[bytes]:
    if server == "redis-server":
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "no"]
    else:
        argv = [sys.executable, "-m", "portside", "resp", "--listen", f"127.0.0.1:{port}",
                "--log-level", "warning", "--control", f"/tmp/portside-bench-resp-{port}.ctl"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=child_setup(cpu, 65536), cwd=REPO)
    wait_listening(port, proc)
    return proc


def run_benchmark(port: int, mode: list[str], requests: int, clients: int,
                  cpu: int | None, server_pid: int | None = None) -> dict[str, float]:
    """redis-benchmark's requests/s per test, and ``other_cpu``: the host's busy CPU over the
    run less the server's and redis-benchmark's own, per second (2 cores = 2.00), which
    says whether something else on the machine took a share of it (the figures are noise
    then). Absent when /proc could not be read."""
    argv = ["redis-benchmark", "-p", str(port), "-t", "ping,set,get", "-n", str(requests),
            "-c", str(clients), "--csv", *mode]
    busy_before, bench_before = host_busy_seconds(), children_cpu_seconds()
    server_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True,
                          preexec_fn=child_setup(cpu, 65536))
    elapsed = time.monotonic() - started
    busy = host_busy_seconds() - busy_before
    ours = children_cpu_seconds() - bench_before
    if server_pid is not None:
        ours += cpu_seconds(server_pid) - server_before
    figures: dict[str, float] = {}
    if busy_before >= 0 and elapsed > 0:
        figures["other_cpu"] = max(0.0, busy - ours) / elapsed
    for line in done.stdout.splitlines():
        fields = [field.strip('"') for field in line.split(",")]
        if fields and fields[0] in TESTS:
            figures[fields[0]] = float(fields[1])
    missing = set(TESTS) - set(figures)
    if missing:
        raise RuntimeError(f"redis-benchmark reported no {sorted(missing)}: {done.stdout!r}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    for tool in ("redis-benchmark", "redis-server"):
        if shutil.which(tool) is None:
            print(f"bench.resp: {tool} is missing (apt-get install redis-tools redis-server)",
                  file=sys.stderr)
            return 2
    cpus = usable_cpus()
    server_cpu, load_cpu = (cpus[1], cpus[0]) if len(cpus) > 1 else (None, None)
    servers = ("portside resp", "redis-server")
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {m: {t: [] for t in (*TESTS, "other_cpu")} for m in MODES} for s in servers}
    for round_ in range(args.rounds):
        for server in servers:  # side by side in every round
            port = free_port()
            proc = start(server, port, server_cpu)
            try:
                for mode, flags in MODES.items():
                    requests = args.requests // 5 if "-k 0" in mode else args.requests
                    figures = run_benchmark(port, flags, requests, args.clients, load_cpu,
                                            proc.pid)
                    for test, value in figures.items():
                        samples[server][mode][test].append(value)
                    print(f"round {round_ + 1} {server} {mode}: {figures}", flush=True)
            finally:
                proc.terminate()
                proc.wait(20)
    medians = {s: {m: {t: statistics.median(v) for t, v in tests.items() if v}
                   for m, tests in modes.items()} for s, modes in samples.items()}
    lines = ["# portside resp beside redis-server (redis-benchmark requests/s, medians of "
             f"{args.rounds} rounds)", "",
             f"redis-benchmark -t ping,set,get -c {args.clients} -n {args.requests} "
             f"(-k 0: -n {args.requests // 5}); server on CPU {server_cpu}, redis-benchmark on "
             f"CPU {load_cpu}; commit {commit()['short']}.", "",
             "| mode | test | portside resp | redis-server | portside / redis |",
             "|---|---|---:|---:|---:|"]
    for mode in MODES:
        for test in TESTS:
            ours, theirs = medians["portside resp"][mode][test], medians["redis-server"][mode][test]
            lines.append(f"| {mode} | {test} | {ours:,.0f} | {theirs:,.0f} | "
                         f"{ours / theirs:.2f} |")
    lines += ["", "Other CPU (the host's busy time less the server's and redis-benchmark's, "
              "per second, 2 cores = 2.00; highest round): "
              + "; ".join(f"{server} {mode}: "
                          + (f"{max(samples[server][mode]['other_cpu']):.2f}"
                             if samples[server][mode]["other_cpu"] else "unknown")
                          for server in servers for mode in MODES)
              + ". Above 0.25 the figures are noise: rerun on a quiet machine."]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "resp-latest.md").write_text("\n".join(lines) + "\n")
    (args.results_dir / "resp-latest.json").write_text(json.dumps(
        {"machine": machine(server_cpu, load_cpu), "commit": commit(), "medians": medians,
         "samples": samples, "settings": vars(args) | {"results_dir": str(args.results_dir)}},
        indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
