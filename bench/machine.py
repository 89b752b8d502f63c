"""What the results must say about where they were measured: machine, software and commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import selectors
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.build import compiler_version
from bench.procfs import nofile_limit, usable_cpus

REPO = Path(__file__).resolve().parent.parent


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


#: Results the benchmark writes itself: new files there do not make the measured code dirty.
RESULTS_PREFIX = "bench/results/"


def _git_raw(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _git(*args: str) -> str:
    return _git_raw(*args).strip()


def dirty_paths(porcelain_z: str) -> list[str]:
    """The paths of ``git status --porcelain -z`` output (``XY PATH``, NUL-terminated; a
    rename's source path follows as an entry of its own), results files left out. Parsed
    whole: stripping the output first cost the first path its first character (" M a" is a
    change to ``a`` in the work tree)."""
    entries = porcelain_z.split("\0")
    paths: list[str] = []
    index = 0
    while index < len(entries):
        entry = entries[index]
        index += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:
            index += 1  # the source path of a rename or copy
        if not path.startswith(RESULTS_PREFIX):
            paths.append(path)
    return paths


def commit() -> dict[str, Any]:
    """The commit measured; ``dirty`` lists files changed since it (they were measured too,
    so such a run never becomes ``latest``: see report.write)."""
    return {"commit": _git("rev-parse", "HEAD") or "unknown",
            "short": _git("rev-parse", "--short", "HEAD") or "unknown",
            "subject": _git("log", "-1", "--format=%s"),
            "dirty": dirty_paths(_git_raw("status", "--porcelain", "-z"))}


def machine(server_cpu: int | None, loadgen_cpu: int | None) -> dict[str, Any]:
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal:")), 0)
    return {
        "cores": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "loop": {"asyncio": f"stdlib asyncio ({selectors.DefaultSelector.__name__})",
                 "uvloop": _version("uvloop"),
                 "portside_compiled": "portside's compiled epoll loop (Cython)",
                 "portside_epoll": "portside's own select.epoll loop, pure Python"},
        "compiler": compiler_version(),
        "pinning": {"server_cpu": server_cpu, "loadgen_cpu": loadgen_cpu},
        "nofile_limit": list(nofile_limit()),
        "loadavg_at_start": _read("/proc/loadavg"),
        "sysctl": {name: _read(f"/proc/sys/net/{name.replace('.', '/')}") for name in (
            "ipv4.ip_local_port_range", "ipv4.tcp_tw_reuse", "ipv4.tcp_syncookies",
            "ipv4.tcp_max_syn_backlog", "core.somaxconn")},
    }
