"""What control commands do to a single server, and the JSON form of its statistics."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from portside.control import protocol
from portside.server import Server

TOTALLED = ("accepted", "pending", "active", "closed", "first_data_timeouts", "evicted",
            "limited", "accept_errors", "proxy_errors", "tls_failures", "idle_timeouts",
            "read_timeouts", "write_timeouts", "bytes_in", "bytes_out", "ttfb_count")


def worker_document(server: Server, started_at: float) -> dict[str, Any]:
    """One process's statistics as plain JSON data."""
    stats = server.statistics()
    return {
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - started_at, 3),
        "state": stats.state,
        "engine": stats.engine,
        "accepting_paused": stats.accepting_paused,
        "connections": stats.active + stats.pending,
        "loop_lag": round(stats.loop_lag, 6),
        "loop_lag_max": round(stats.loop_lag_max, 6),
        "listeners": [dataclasses.asdict(listener) for listener in stats.listeners],
        "pools": {"buffers": dataclasses.asdict(stats.buffer_pool),
                  "connections": dataclasses.asdict(stats.connection_pool)},
    }


def combine(workers: list[dict[str, Any]], pid: int, uptime: float) -> dict[str, Any]:
    """The ``stats`` reply: totals, per listener (summed over workers), per worker, pools."""
    listeners: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, int]] = {}
    for worker in workers:
        for entry in worker["listeners"]:
            merged = listeners.setdefault(entry["name"], {
                "name": entry["name"], "address": entry["address"], "policy": entry["policy"],
                **{key: 0 for key in TOTALLED}, "ttfb_buckets": [0] * len(entry["ttfb_buckets"]),
                "ttfb_sum": 0.0})
            for key in TOTALLED:
                merged[key] += entry[key]
            merged["ttfb_buckets"] = [a + b for a, b in zip(merged["ttfb_buckets"],
                                                            entry["ttfb_buckets"], strict=True)]
            merged["ttfb_sum"] += entry["ttfb_sum"]
            by_reason = merged.setdefault("closed_by_reason", {})
            for reason, count in entry.get("closed_by_reason", {}).items():
                by_reason[reason] = by_reason.get(reason, 0) + count
        for pool_name, figures in worker["pools"].items():
            summed = pools.setdefault(pool_name, {})
            for key, value in figures.items():
                if key in ("item_size", "max_free"):  # a setting, not a count: same everywhere
                    summed[key] = value
                else:
                    summed[key] = summed.get(key, 0) + value
    totals = {key: sum(entry[key] for entry in listeners.values()) for key in TOTALLED}
    return {
        "pid": pid,
        "uptime": round(uptime, 3),
        "accepting_paused": any(worker["accepting_paused"] for worker in workers),
        "totals": totals,
        "listeners": list(listeners.values()),
        "workers": [{key: worker[key] for key in ("pid", "uptime", "state", "connections",
                                                  "loop_lag", "loop_lag_max")}
                    for worker in workers],
        "pools": pools,
    }


class ServerTarget:
    """Control commands applied to one in-process ``Server`` (one worker, or ``--workers 1``)."""

    def __init__(self, server: Server, as_worker: bool = False) -> None:
        self.server = server
        self.as_worker = as_worker  # a worker answers with its own figures; the supervisor sums
        self.started_at = time.monotonic()

    def control(self, command: str, respond: Callable[[bytes], None]) -> None:
        if command == "pause":
            self.server.pause_accepting()
            respond(protocol.reply_ok({"accepting_paused": True}))
        elif command == "resume":
            self.server.resume_accepting()
            respond(protocol.reply_ok({"accepting_paused": False}))
        elif command == "shutdown":
            respond(protocol.reply_ok({"shutting_down": True}))
            self.server.shutdown()
        elif command == "stats":
            document = worker_document(self.server, self.started_at)
            if not self.as_worker:
                document = combine([document], os.getpid(), time.monotonic() - self.started_at)
            respond(protocol.reply_ok(document))
        else:
            respond(protocol.reply_error(f"unknown command {command!r}"))
