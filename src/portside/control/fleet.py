"""What control commands do to a supervisor's workers: asked of each, answers combined.

Worker numbers: each worker has a number (1 .. workers) that its replacement takes over, so
metric series labelled by it survive restarts; logs, ``ctl``, ``top`` and metrics all use it.
What ended workers counted stays in every counter (``statistics.Retired``). Connection ids
under a supervisor are ``PID.ID`` (the worker's pid, its own connection id): unambiguous even
while an old and a new worker share a number. Settings an operator changed (paused listeners,
max_connections, the log level) are sent again to every worker that starts later, so a restart
does not undo them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from portside.control import protocol
from portside.control.target import combine, listing, set_log_level
from portside.statistics import process_figures

if TYPE_CHECKING:
    from portside.workers.supervisor import Supervisor, Worker

logger = logging.getLogger("portside.control")

Respond = Callable[[bytes], None]


class SupervisorTarget:
    """Control commands carried out across every worker of a ``Supervisor``."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.draining = False
        #: Requests replayed to each new worker, by what they set.
        self.sticky: dict[tuple[str, str | None], protocol.Request] = {}

    def replay(self, worker: Worker) -> None:
        """A new worker is ready: give it the settings the others were given."""
        for request in self.sticky.values():
            self.supervisor.ask(worker, request.command, lambda result: None, request.args)

    def control(self, request: protocol.Request, respond: Respond) -> None:
        command, args = request.command, request.args
        supervisor = self.supervisor
        names = [config.label for config in supervisor.listener_configs]
        if command != "connections" and args.get("listener", names[0]) not in names:
            respond(protocol.reply_error(f"no listener named {args['listener']!r} "
                                         f"(listeners: {', '.join(names)})"))
            return
        if command == "stats":
            supervisor.fan_out("stats", lambda results: respond(protocol.reply_ok(
                self.statistics(results))))
        elif command == "shutdown":
            respond(protocol.reply_ok({"shutting_down": True}))
            supervisor.shutdown()
        elif command in ("pause", "resume", "drain", "max-connections", "log-level"):
            self._remember(request)
            if command == "log-level":
                set_log_level(args["level"])
            supervisor.fan_out(command, lambda results: respond(self._first_or_error(
                command, results)), args)
        elif command == "connections":
            supervisor.fan_out(command, lambda results: respond(protocol.reply_ok(
                self._connections(results, args.get("limit")))), args)
        elif command in ("close", "abort"):
            self._one_connection(request, respond)
        else:
            respond(protocol.reply_error(f"unknown command {command!r}"))

    def _remember(self, request: protocol.Request) -> None:
        command, listener = request.command, request.get("listener")
        if command in ("pause", "resume", "drain"):
            supervisor = self.supervisor
            if listener is None:
                self.sticky = {key: value for key, value in self.sticky.items()
                               if key[0] != "accepting"}
                supervisor.paused = command != "resume"
                self.draining = command == "drain"
            self.sticky[("accepting", listener)] = request
        else:
            self.sticky[(command, listener)] = request

    def _first_or_error(self, command: str, results: list[Any]) -> bytes:
        if not results:
            return protocol.reply_error(f"{command}: no worker answered")
        result = dict(results[0])
        result["workers"] = len(results)
        if command == "drain":
            result["connections"] = sum(entry.get("connections", 0) for entry in results)
        if command in ("pause", "resume", "drain"):
            result["accepting_paused"] = self.supervisor.paused
        return protocol.reply_ok(result)

    def _connections(self, results: list[Any], limit: int | None) -> dict[str, Any]:
        entries = []
        for result in results:
            for entry in result["connections"]:
                entry["id"] = f"{entry['pid']}.{entry['id']}"
                entries.append(entry)
        total = sum(result["total"] for result in results)
        return listing(entries, total, limit or 100)

    def _one_connection(self, request: protocol.Request, respond: Respond) -> None:
        pid_text, dot, ident = request.args["id"].partition(".")
        worker = self.supervisor.workers.get(int(pid_text)) if pid_text.isdigit() else None
        if not dot or worker is None:
            respond(protocol.reply_error(
                f"no worker has connection {request.args['id']!r} (under --workers an id is "
                "PID.ID, as 'portside ctl connections' lists it)"))
            return

        def answered(result: Any) -> None:
            if result is None:
                respond(protocol.reply_error(f"no open connection with id "
                                             f"{request.args['id']!r}"))
            else:
                for entry in result.values():
                    entry["id"] = request.args["id"]
                respond(protocol.reply_ok(result))

        self.supervisor.ask(worker, request.command, answered, {"id": ident})

    def statistics(self, documents: list[dict[str, Any]]) -> dict[str, Any]:
        supervisor = self.supervisor
        slots = {worker.pid: worker.slot for worker in supervisor.workers.values()}
        # A worker reaped while its reply was on the way is counted in ``retired`` already.
        documents = [document for document in documents if document["process"]["pid"] in slots]
        for document in documents:
            document["process"]["slot"] = slots[document["process"]["pid"]]
        own = {"slot": "supervisor", "pid": os.getpid(),
               "state": "stopping" if supervisor.shutting_down else "running",
               "uptime": round(time.monotonic() - supervisor.started_at, 3),
               "connections": 0, "loop_lag": 0.0, "loop_lag_max": 0.0, **process_figures()}
        document = combine(documents, time.monotonic() - supervisor.started_at, own,
                           supervisor.retired.document())
        document["accepting_paused"] = supervisor.paused
        document["draining"] = self.draining
        document["restarts"] = supervisor.restarts
        document["shutting_down"] = supervisor.shutting_down
        return document
