"""What the harness reads about a process from /proc, and how it sets up the ones it starts."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


def host_busy_seconds() -> float:
    """The whole host's busy CPU time so far (every CPU, idle and iowait left out), from
    /proc/stat; -1 when it cannot be read. The difference over a window, less what the
    measured processes used, is the "other CPU" that makes a figure noisy."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(field) for field in fields[:8]]
    except (OSError, ValueError, IndexError):
        return -1.0
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """utime + stime of this process's waited-for children (``getrusage``)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fd_count(pid: int) -> int:
    """How many descriptors ``pid`` holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def nofile_limit() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def child_setup(cpu: int | None, nofile: int) -> Callable[[], None]:
    """A ``preexec_fn``: pin the child to ``cpu`` and let it open ``nofile`` descriptors.

    The soft limit is raised to ``nofile`` (and the hard one too where the harness may, as
    root); where it may not, the child gets the hard limit and the harness reports it.
    """
    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft >= nofile:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(nofile, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return setup
