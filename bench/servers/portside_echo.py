"""portside's echo example as a benchmark server: ``EchoHandler`` on the chosen engine.

An immediate listener always; with ``--data-first`` also a data-first one (the slowloris
scenario's target); with ``--certfile``/``--keyfile`` they serve TLS, with the context
``portside --certfile`` makes. Prints both ports as one JSON line, then serves until SIGTERM
(portside's graceful shutdown) or ``--max-seconds``.
"""

from __future__ import annotations

import logging
import threading

from bench.servers.common import BACKLOG, HOST, announce, parser
from portside import AcceptPolicy, Engine, ListenerConfig, Server, ServerConfig
from portside.config import ProcessConfig, default_of
from portside.examples.echo import EchoHandler
from portside.workers.app import tls_context


def main() -> None:
    cli = parser(__doc__ or "")
    cli.add_argument("--engine", choices=[e.value for e in Engine], default="epoll")
    cli.add_argument("--data-first", action="store_true", help="add a data-first listener")
    cli.add_argument("--defer-accept", type=int,
                     default=default_of(ListenerConfig, "defer_accept"),
                     help="TCP_DEFER_ACCEPT seconds on the data-first listener (0: off)")
    cli.add_argument("--first-data-timeout", type=float,
                     default=default_of(ListenerConfig, "first_data_timeout"),
                     help="seconds a data-first connection may stay silent")
    cli.add_argument("--max-connections", type=int,
                     default=default_of(ListenerConfig, "max_connections"),
                     help="per-listener ceiling on open connections")
    args = cli.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tls = tls_context(ProcessConfig(certfile=args.certfile, keyfile=args.keyfile))

    listeners = [ListenerConfig(host=HOST, port=args.port, policy=AcceptPolicy.IMMEDIATE,
                                name="immediate", backlog=BACKLOG,
                                max_connections=args.max_connections, tls=tls)]
    if args.data_first:
        listeners.append(ListenerConfig(host=HOST, port=0, policy=AcceptPolicy.DATA_FIRST,
                                        name="data-first", backlog=BACKLOG,
                                        defer_accept=args.defer_accept,
                                        first_data_timeout=args.first_data_timeout,
                                        max_connections=args.max_connections, tls=tls))
    server = Server(EchoHandler(), listeners,
                    ServerConfig(engine=Engine(args.engine), drain_timeout=1.0))
    server.start()
    ports = [listener.port for listener in server.listeners]
    lifetime = threading.Timer(args.max_seconds, server.shutdown)
    lifetime.daemon = True
    lifetime.start()
    announce(ports[0], ports[1] if len(ports) > 1 else 0)
    server.run()
    lifetime.cancel()


if __name__ == "__main__":
    main()
