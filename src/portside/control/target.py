"""What control commands do to a single server, and the JSON documents of its statistics.

The ``stats`` document is derived from the declarations in ``portside.statistics``: each
listener entry is its ``ListenerStatistics`` as JSON, merged over workers by the rule each
figure declares, and each process entry has the fields of ``WorkerStatistics``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from portside.config import address_label
from portside.control import protocol
from portside.engine.connection import Connection
from portside.engine.listener import Listener
from portside.server import Server
from portside.statistics import (
    POOL_FIGURES,
    ListenerStatistics,
    OutboundStatistics,
    UpstreamStatistics,
    WorkerStatistics,
    figures,
    merge,
    process_figures,
)

logger = logging.getLogger("portside.control")

LISTENER_FIGURES = figures(ListenerStatistics)
WORKER_FIGURES = figures(WorkerStatistics)
OUTBOUND_FIGURES = figures(OutboundStatistics)
UPSTREAM_FIGURES = figures(UpstreamStatistics)
#: The listener figures summed into the document's ``totals``.
TOTALLED = tuple(name for name, declared in LISTENER_FIGURES
                 if declared.kind in ("counter", "gauge", "part")
                 and declared.merged_by == "sum")
DEFAULT_LIST = 100  # connections listed when the request sets no limit


def worker_document(server: Server, started_at: float, slot: str = "1") -> dict[str, Any]:
    """One process's statistics as plain JSON data (a single server is worker 1 of 1; under a
    supervisor, ``control.fleet`` sets each worker's number)."""
    stats = server.statistics()
    process = {
        "slot": slot, "pid": os.getpid(), "state": stats.state,
        "uptime": round(time.monotonic() - started_at, 3),
        "connections": stats.active + stats.pending,
        "loop_lag": round(stats.loop_lag, 6), "loop_lag_max": round(stats.loop_lag_max, 6),
        **process_figures(),
    }
    return {
        "process": process,
        "engine": stats.engine,
        "accepting_paused": stats.accepting_paused,
        "listeners": [dataclasses.asdict(listener) for listener in stats.listeners],
        "outbound": [dataclasses.asdict(outbound) for outbound in stats.outbound],
        "upstreams": [dataclasses.asdict(upstream) for upstream in stats.upstreams],
        "pools": {"buffers": dataclasses.asdict(stats.buffer_pool),
                  "connections": dataclasses.asdict(stats.connection_pool)},
    }


def combine(workers: list[dict[str, Any]], uptime: float,
            supervisor: dict[str, Any] | None = None,
            retired: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``stats`` reply: totals, per listener (merged over workers), per process, pools.
    ``retired``: what workers that have ended counted (``statistics.Retired``), merged after
    the living so that counters never go backwards."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    pools: dict[str, list[dict[str, Any]]] = {}
    outbound: dict[str, list[dict[str, Any]]] = {}
    upstreams: dict[str, list[dict[str, Any]]] = {}
    for worker in [*workers, *([retired] if retired else [])]:
        for entry in worker["listeners"]:
            by_name.setdefault(entry["name"], []).append(entry)
        for pool_name, pool in worker["pools"].items():
            pools.setdefault(pool_name, []).append(pool)
        for entry in worker.get("outbound", ()):
            outbound.setdefault(entry["name"], []).append(entry)
        for entry in worker.get("upstreams", ()):
            upstreams.setdefault(entry["name"], []).append(entry)
    listeners = [merge(LISTENER_FIGURES, entries) for entries in by_name.values()]
    return {
        "pid": os.getpid(),
        "uptime": round(uptime, 3),
        "engine": workers[0]["engine"] if workers else None,
        "accepting_paused": any(worker["accepting_paused"] for worker in workers),
        "totals": {name: sum(entry.get(name, 0) for entry in listeners) for name in TOTALLED},
        "listeners": listeners,
        "outbound": [merge(OUTBOUND_FIGURES, entries) for entries in outbound.values()],
        "upstreams": [merge(UPSTREAM_FIGURES, entries) for entries in upstreams.values()],
        "workers": sorted((worker["process"] for worker in workers),
                          key=lambda process: (_slot_order(process["slot"]), process["pid"])),
        "supervisor": supervisor,
        "pools": {name: merge(POOL_FIGURES.items(), entries) for name, entries in pools.items()},
    }


def _slot_order(slot: str) -> int:
    return int(slot) if slot.isdigit() else -1


def connection_entry(conn: Connection, pid: int) -> dict[str, Any]:
    counters = conn.counters()
    state = "pending" if conn.is_pending else "open" if conn.is_open else "closing"
    return {"id": str(conn.id), "pid": pid, "listener": conn.listener.config.label,
            "peer": address_label(conn.peer_address), "age": round(counters.age, 3),
            "state": state, "bytes_in": counters.bytes_in, "bytes_out": counters.bytes_out,
            "queued": counters.write_buffer_size}




def matches(entry: dict[str, Any], request: protocol.Request) -> bool:
    """A connection entry passes the ``connections`` filters."""
    listener, state, peer = request.get("listener"), request.get("state"), request.get("peer")
    return ((listener is None or entry["listener"] == listener)
            and (state is None or entry["state"] == state)
            and (peer is None or peer in entry["peer"]))


def listing(entries: list[dict[str, Any]], total: int, limit: int) -> dict[str, Any]:
    """The ``connections`` reply: the oldest first, at most ``limit``, and how many matched."""
    entries.sort(key=lambda entry: -entry["age"])
    return {"total": total, "connections": entries[:limit]}


class ServerTarget:
    """Control commands applied to one in-process ``Server`` (one worker, or no workers)."""

    def __init__(self, server: Server, as_worker: bool = False) -> None:
        self.server = server
        self.as_worker = as_worker  # a worker answers with its own figures; the supervisor sums
        self.started_at = time.monotonic()
        self.draining = False

    def control(self, request: protocol.Request, respond: Callable[[bytes], None]) -> None:
        try:
            result = getattr(self, "do_" + request.command.replace("-", "_"))(request)
        except LookupError as exc:
            respond(protocol.reply_error(str(exc.args[0])))
            return
        respond(protocol.reply_ok(result))

    def readiness(self) -> str | None:
        """None while new connections are welcome (``/readyz``), else why not."""
        state = self.server.state.value
        if state != "running":
            return state  # started (not yet serving), draining, stopped
        if self.draining:
            return "draining"
        return "paused" if self.server.statistics().accepting_paused else None

    def _listeners(self, name: str | None) -> list[Listener]:
        listeners = list(self.server._engine_listeners)
        if name is None:
            return listeners
        chosen = [listener for listener in listeners if listener.config.label == name]
        if not chosen:
            known = ", ".join(listener.config.label for listener in listeners)
            raise LookupError(f"no listener named {name!r} (listeners: {known})")
        return chosen

    def do_stats(self, request: protocol.Request) -> dict[str, Any]:
        document = worker_document(self.server, self.started_at)
        if not self.as_worker:
            document = combine([document], time.monotonic() - self.started_at)
            document["draining"] = self.draining
        return document

    def do_pause(self, request: protocol.Request) -> dict[str, Any]:
        name = request.get("listener")
        if name is None:
            self.server.pause_accepting()
        else:
            for listener in self._listeners(name):
                listener.pause()
        return self._accepting()

    def do_resume(self, request: protocol.Request) -> dict[str, Any]:
        name = request.get("listener")
        if name is None:
            self.draining = False
            self.server.resume_accepting()
        else:
            for listener in self._listeners(name):
                listener.resume()
        return self._accepting()

    def _accepting(self) -> dict[str, Any]:
        return {"accepting_paused": self.server.statistics().accepting_paused,
                "listeners": {listener.config.label: listener.accept_state
                              for listener in self.server._engine_listeners}}

    def do_drain(self, request: protocol.Request) -> dict[str, Any]:
        self.draining = True
        self.server.pause_accepting()
        return {"draining": True, "connections": len(self.server.connections())}

    def do_connections(self, request: protocol.Request) -> dict[str, Any]:
        pid = os.getpid()
        entries = [entry for entry in (connection_entry(conn, pid)
                                       for conn in self.server._live())
                   if matches(entry, request)]
        return listing(entries, len(entries), request.get("limit") or DEFAULT_LIST)

    def _connection(self, ident: str) -> Connection:
        for conn in self.server._live():
            if str(conn.id) == ident:
                return conn
        raise LookupError(f"no open connection with id {ident!r}")

    def do_close(self, request: protocol.Request) -> dict[str, Any]:
        conn = self._connection(request.get("id"))
        entry = connection_entry(conn, os.getpid())
        conn.close()
        return {"closed": entry}

    def do_abort(self, request: protocol.Request) -> dict[str, Any]:
        conn = self._connection(request.get("id"))
        entry = connection_entry(conn, os.getpid())
        conn.abort()
        return {"aborted": entry}

    def do_max_connections(self, request: protocol.Request) -> dict[str, Any]:
        value = request.get("value")
        changed = {}
        for listener in self._listeners(request.get("listener")):
            listener.max_connections = value
            changed[listener.config.label] = value
        return {"max_connections": changed}

    def do_log_level(self, request: protocol.Request) -> dict[str, Any]:
        return {"log_level": set_log_level(request.get("level"))}

    def do_shutdown(self, request: protocol.Request) -> dict[str, Any]:
        # The reply is sent before the loop could stop: the server shuts down on the loop.
        self.server.call_soon_threadsafe(self.server.shutdown)
        return {"shutting_down": True}


def set_log_level(level: str) -> str:
    """Set the level of the root logger (where the command line's handler sits)."""
    logging.getLogger().setLevel(level.upper())
    return level
