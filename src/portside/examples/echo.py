"""The seed's example: an echo server with a data-first and an immediate listener."""

from __future__ import annotations

from portside import Connection, Handler


class EchoHandler(Handler):
    """Writes back every byte it reads; on the client's EOF, finishes its writes and closes.

    ``connection_made`` (inherited) passes a data-first connection's first bytes to
    ``data_received``, and ``eof_received`` (inherited) closes gracefully.
    """

    def data_received(self, conn: Connection, data: memoryview) -> None:
        conn.write(data)
