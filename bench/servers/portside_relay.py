"""portside's relay example as a benchmark server: ``RelayHandler`` forwarding every client to
``--upstream`` on the chosen engine, beside HAProxy in TCP mode (``haproxy_relay``).

With ``--certfile``/``--keyfile`` it terminates TLS (``portside relay --certfile``: TLS in,
plain out). Prints its port as one JSON line, then serves until SIGTERM (portside's graceful
shutdown) or ``--max-seconds``.
"""

from __future__ import annotations

import logging
import threading

from bench.servers.common import BACKLOG, HOST, announce, parser
from portside import Engine, ListenerConfig, Server, ServerConfig
from portside.config import ProcessConfig, default_of
from portside.examples.relay import RelayHandler, parse_upstreams
from portside.workers.app import tls_context


def main() -> None:
    cli = parser(__doc__ or "")
    cli.add_argument("--engine", choices=[e.value for e in Engine], default="auto")
    cli.add_argument("--upstream", required=True, help="HOST:PORT of the server relayed to")
    cli.add_argument("--max-connections", type=int,
                     default=default_of(ListenerConfig, "max_connections"),
                     help="per-listener ceiling on open connections")
    args = cli.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tls = tls_context(ProcessConfig(certfile=args.certfile, keyfile=args.keyfile))
    listener = ListenerConfig(host=HOST, port=args.port, name="relay", backlog=BACKLOG,
                              max_connections=args.max_connections, tls=tls)
    handler = RelayHandler(parse_upstreams(args.upstream), send_proxy=0, connect_timeout=5.0)
    server = Server(handler, [listener],
                    ServerConfig(engine=Engine(args.engine), drain_timeout=1.0))
    server.start()
    lifetime = threading.Timer(args.max_seconds, server.shutdown)
    lifetime.daemon = True
    lifetime.start()
    announce(server.listeners[0].port)
    server.run()
    lifetime.cancel()


if __name__ == "__main__":
    main()
