"""The echo servers the harness compares, each a minimal server written for it.

A ``ServerSpec`` says how to start one; every server listens on 127.0.0.1 only, prints
``{"port": N, "data_first_port": M}`` on stdout once it listens, and stops on SIGTERM or by
itself after ``--max-seconds``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ServerSpec:
    name: str
    description: str
    #: ``python -m MODULE ARGS`` for a Python server ...
    module: str | None = None
    args: tuple[str, ...] = ()
    #: ... or a C source file the harness compiles.
    c_source: Path | None = None
    #: portside servers also run the slowloris scenario (they have a data-first listener).
    is_portside: bool = False
    #: A source tree to run the server from (portside and bench), instead of this one.
    tree: Path | None = None
    #: A relay (scenario r only): the server it forwards to, started first and passed to it
    #: as ``--upstream 127.0.0.1:PORT``.
    relays_to: str | None = None


def _aio(name: str, loop: str, style: str, description: str) -> ServerSpec:
    return ServerSpec(name, description, module="bench.servers.aio_echo",
                      args=("--loop", loop, "--style", style))


def _portside(engine: str) -> ServerSpec:
    return ServerSpec(f"portside_{engine}", f"portside EchoHandler, {engine} engine",
                      module="bench.servers.portside_echo", args=("--engine", engine),
                      is_portside=True)


def baseline(engine: str, revision: str, tree: Path) -> ServerSpec:
    """portside's ``engine`` as it was at ``revision``, checked out in ``tree``: the same
    engine before and after a change, side by side in one run."""
    return ServerSpec(f"portside_{engine}@{revision}",
                      f"portside EchoHandler, {engine} engine, at commit {revision}",
                      module="bench.servers.portside_echo", args=("--engine", engine),
                      is_portside=True, tree=tree)


SERVERS: dict[str, ServerSpec] = {spec.name: spec for spec in (
    ServerSpec("c_epoll", "minimal C epoll echo server (the practical limit)",
               c_source=HERE / "c_epoll.c"),
    _aio("uvloop_proto", "uvloop", "protocol", "uvloop, asyncio.Protocol"),
    _aio("uvloop_buffered", "uvloop", "buffered", "uvloop, asyncio.BufferedProtocol"),
    _aio("asyncio_proto", "asyncio", "protocol", "stdlib asyncio, asyncio.Protocol"),
    _aio("asyncio_streams", "asyncio", "streams", "stdlib asyncio, streams"),
    _portside("compiled"),
    _portside("epoll"),
    _portside("asyncio"),
    _portside("uvloop"),
    # (r): relays to the C echo server, measured side by side
    ServerSpec("relay_portside", "portside relay example (RelayHandler), default engine",
               module="bench.servers.portside_relay", relays_to="c_epoll"),
    ServerSpec("relay_haproxy", "HAProxy, mode tcp, nbthread 1",
               module="bench.servers.haproxy_relay", relays_to="c_epoll"),
    # not in the default set, selectable with --servers
    _aio("uvloop_streams", "uvloop", "streams", "uvloop, streams"),
    _aio("asyncio_buffered", "asyncio", "buffered", "stdlib asyncio, asyncio.BufferedProtocol"),
)}

DEFAULT_SERVERS = ("c_epoll", "uvloop_proto", "uvloop_buffered", "asyncio_proto",
                   "asyncio_streams", "portside_compiled", "portside_epoll", "portside_asyncio",
                   "portside_uvloop", "relay_portside", "relay_haproxy")
QUICK_SERVERS = ("c_epoll", "uvloop_proto", "portside_compiled", "portside_epoll")
#: The server the targets hold to: portside's default engine. The others are for comparison.
HELD_TO_TARGETS = "portside_compiled"
#: The references every ratio is taken against.
UVLOOP_REFERENCE = "uvloop_proto"
C_REFERENCE = "c_epoll"
#: The reference of the relay scenario (r).
RELAY_REFERENCE = "relay_haproxy"
RELAY_SCENARIO = "r"


def takes_part(server: str, scenario: str) -> bool:
    """Whether ``server`` is measured in ``scenario``: relays only in (r), and only relays;
    the slowloris scenario (e) only on portside's echo servers."""
    spec = SERVERS[server]
    if (spec.relays_to is not None) != (scenario == RELAY_SCENARIO):
        return False
    return scenario != "e" or spec.is_portside


def references(scenario: str) -> tuple[str, ...]:
    """The servers a scenario's ratios are taken against."""
    return (RELAY_REFERENCE,) if scenario == RELAY_SCENARIO else (UVLOOP_REFERENCE, C_REFERENCE)
