"""Handlers for process tests, loaded with ``portside serve handlers:NAME`` (tests/ on the path)."""

from __future__ import annotations

import os
import time

from portside import Connection, Server
from portside.examples.echo import EchoHandler


class StuckHandler(EchoHandler):
    """Echoes, but b"hang" blocks the worker's loop, as a handler bug would."""

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if bytes(data) == b"hang":
            time.sleep(3600)
        super().data_received(conn, data)


class CrashingHandler(EchoHandler):
    """Dies as soon as its worker starts: the supervisor must back off, not fork in a loop."""

    def server_started(self, server: Server) -> None:
        os._exit(3)


class PeerEcho(EchoHandler):
    """Says who it thinks the client is (the PROXY header's source), then echoes."""

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        host, port = conn.peer_address[:2]
        conn.write(f"peer {host} {port} pid {os.getpid()}\n".encode())
        super().connection_made(conn, first_data)
