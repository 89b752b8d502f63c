"""Minimal asyncio and uvloop echo servers: ``Protocol``, ``BufferedProtocol`` or streams,
plain or, with ``--certfile``/``--keyfile``, TLS (the loop's own TLS transport).

``python -m bench.servers.aio_echo --loop uvloop --style protocol`` listens on 127.0.0.1, prints
its port as one JSON line, and serves until SIGTERM or ``--max-seconds``.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable
from typing import cast

from bench.servers.common import BACKLOG, HOST, READ_SIZE, announce, parser, server_context


class EchoProtocol(asyncio.Protocol):
    """The textbook echo: write back what ``data_received`` got."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class EchoBufferedProtocol(asyncio.BufferedProtocol):
    """Reads into a per-connection 64 KiB buffer and writes back a view of it.

    A transport may keep a view of the buffer when the kernel does not take it all at once
    (uvloop does); the connection then moves to a fresh buffer, so queued bytes never change.
    """

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(self.view[:nbytes])
        if self.transport.get_write_buffer_size():
            self.view = memoryview(bytearray(READ_SIZE))


async def _echo_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _serve(style: str, port: int, max_seconds: float,
                 tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    server: asyncio.Server
    if style == "streams":
        server = await asyncio.start_server(_echo_stream, HOST, port, backlog=BACKLOG,
                                            ssl=tls)
    else:
        factory: Callable[[], asyncio.BaseProtocol] = (
            EchoProtocol if style == "protocol" else EchoBufferedProtocol)
        server = await loop.create_server(factory, HOST, port, backlog=BACKLOG, ssl=tls)
    bound = int(server.sockets[0].getsockname()[1])
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.call_later(max_seconds, stop.set)
    announce(bound)
    await stop.wait()
    server.close()


def main() -> None:
    cli = parser(__doc__ or "")
    cli.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    cli.add_argument("--style", choices=("protocol", "buffered", "streams"), default="protocol")
    args = cli.parse_args()
    if bool(args.certfile) != bool(args.keyfile):
        cli.error("--certfile and --keyfile go together")
    tls = server_context(args.certfile, args.keyfile) if args.certfile else None
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(args.style, args.port, args.max_seconds, tls))
    else:
        with asyncio.Runner() as runner:
            runner.run(_serve(args.style, args.port, args.max_seconds, tls))


if __name__ == "__main__":
    main()
