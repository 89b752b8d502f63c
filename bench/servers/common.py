"""What every Python echo server of the harness shares: its options and how it says it is up."""

from __future__ import annotations

import argparse
import json
import ssl
import sys

HOST = "127.0.0.1"  # loopback only: the benchmark never listens anywhere else
BACKLOG = 1024  # the same listen backlog for every server (portside's default)
READ_SIZE = 64 * 1024


def parser(description: str) -> argparse.ArgumentParser:
    """The options the harness passes to every server."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="listening port (0: any free one)")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="the server stops by itself after this long")
    parser.add_argument("--certfile", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--keyfile", help="... and this private key (PEM)")
    return parser


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The server-side TLS context of the asyncio and uvloop servers: the one portside's
    ``--certfile`` makes (the defaults of ``ssl.create_default_context``, TLS 1.2 at least,
    session tickets on), so the TLS scenarios compare engines, not settings."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def announce(port: int, data_first_port: int = 0) -> None:
    """Tell the harness the server is listening: one JSON line on stdout."""
    sys.stdout.write(json.dumps({"port": port, "data_first_port": data_first_port}) + "\n")
    sys.stdout.flush()
