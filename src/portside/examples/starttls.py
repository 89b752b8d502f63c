"""STARTTLS on a line protocol: a connection starts plain and upgrades to TLS in place.

The protocol (one command per ``\\n``-terminated line, as SMTP, IMAP and XMPP do it): the
server greets with ``READY``; ``STARTTLS`` is answered ``GO`` in the clear, and the next bytes
either way are the TLS handshake; any other line is answered with ``plain LINE`` or ``tls
LINE``, so a client can tell which side of the switch its line was read on.

The STARTTLS injection (CVE-2011-0411): lines a client pipelines after ``STARTTLS`` in the
same packet arrive in the clear, so they must not be answered as if they had come over TLS.
The server hands ``start_tls`` what it still holds unread (``unread=``); with any, portside
refuses the upgrade and closes the connection (``PROTOCOL_ERROR``, one log line), as Postfix
does with "improper command pipelining after STARTTLS". The client side does the same with a
server that sends anything after ``GO``.

Serve it on a plain listener: ``Server(StartTlsHandler(context), [ListenerConfig(port=2525)])``
with ``context`` a server-side ``ssl.SSLContext`` holding the certificate (docs/tls.md).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator

from portside import Connection, Handler

MAX_LINE = 4096  # bytes a line may hold; a longer one closes the connection


def _lines(conn: Connection, data: memoryview) -> Iterator[bytes]:
    """The whole lines in the connection's buffer (``conn.user_data``) with ``data`` added,
    one at a time: each leaves the buffer as it is taken, so what the buffer holds when the
    caller stops is exactly what it has not read. A line past MAX_LINE closes the connection."""
    buffer: bytearray = conn.user_data
    buffer += data
    while (end := buffer.find(b"\n")) >= 0:
        line = bytes(buffer[:end]).rstrip(b"\r")
        del buffer[:end + 1]
        yield line
    if len(buffer) > MAX_LINE:
        conn.close()


class StartTlsHandler(Handler):
    """The server side: ``context`` is a server-side context with a certificate;
    ``handshake_timeout`` defaults to the listener's first_data_timeout."""

    def __init__(self, context: ssl.SSLContext, handshake_timeout: float | None = None) -> None:
        self.context = context
        self.handshake_timeout = handshake_timeout

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        conn.user_data = bytearray()
        conn.write(b"READY\n")
        if first_data is not None:
            self.data_received(conn, first_data)

    def data_received(self, conn: Connection, data: memoryview) -> None:
        for line in _lines(conn, data):
            if not conn.is_open:
                return
            if line.upper() == b"STARTTLS" and conn.tls is None:
                conn.write(b"GO\n")  # in the clear: written before the switch
                # What the client sent after the command came in the clear: refused.
                if conn.start_tls(self.context, server_side=True, unread=len(conn.user_data),
                                  handshake_timeout=self.handshake_timeout):
                    conn.user_data = bytearray()
                return
            conn.write(b"%s %s\n" % (b"plain" if conn.tls is None else b"tls", line))


class StartTlsClient(Handler):
    """The client side (``server.connect(host, port, StartTlsClient(context, name))``): asks
    for TLS once greeted, sends ``lines`` right after ``start_tls`` (they wait, then go out
    encrypted), and keeps the answers in ``answers``."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str,
                 lines: tuple[bytes, ...] = (b"PING",)) -> None:
        self.context = context
        self.server_hostname = server_hostname
        self.lines = lines
        self.answers: list[bytes] = []
        self.established = False

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        conn.user_data = bytearray()

    def data_received(self, conn: Connection, data: memoryview) -> None:
        for line in _lines(conn, data):
            if line == b"READY" and conn.tls is None:
                conn.write(b"STARTTLS\n")
            elif line == b"GO" and conn.tls is None:
                if conn.start_tls(self.context, server_hostname=self.server_hostname,
                                  unread=len(conn.user_data)):  # anything after GO: refused
                    conn.user_data = bytearray()
                    for request in self.lines:
                        conn.write(request + b"\n")
                return
            else:
                self.answers.append(line)
                if len(self.answers) == len(self.lines):
                    conn.close()

    def tls_established(self, conn: Connection) -> None:
        self.established = True
