"""The echo servers the harness compares, each a minimal server written for it.

A ``ServerSpec`` says how to start one; every server listens on 127.0.0.1 only, prints
``{"port": N, "data_first_port": M}`` on stdout once it listens, and stops on SIGTERM or by
itself after ``--max-seconds``. The TLS scenarios start the same programs with
``--certfile``/``--keyfile``.
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
    #: Measured in the TLS scenarios too (t, h; rt for a relay), started with --certfile.
    tls: bool = False


def _aio(name: str, loop: str, style: str, description: str, tls: bool = False) -> ServerSpec:
    return ServerSpec(name, description, module="bench.servers.aio_echo",
                      args=("--loop", loop, "--style", style), tls=tls)


def _portside(engine: str, tls: bool = False) -> ServerSpec:
    return ServerSpec(f"portside_{engine}", f"portside EchoHandler, {engine} engine",
                      module="bench.servers.portside_echo", args=("--engine", engine),
                      is_portside=True, tls=tls)


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
    _aio("uvloop_proto", "uvloop", "protocol", "uvloop, asyncio.Protocol", tls=True),
    _aio("uvloop_buffered", "uvloop", "buffered", "uvloop, asyncio.BufferedProtocol"),
    _aio("asyncio_proto", "asyncio", "protocol", "stdlib asyncio, asyncio.Protocol", tls=True),
    _aio("asyncio_streams", "asyncio", "streams", "stdlib asyncio, streams"),
    _portside("compiled", tls=True),
    _portside("epoll", tls=True),
    _portside("asyncio"),
    _portside("uvloop"),
    # (r), (rt): relays to the C echo server, measured side by side
    ServerSpec("relay_portside", "portside relay example (RelayHandler), default engine",
               module="bench.servers.portside_relay", relays_to="c_epoll", tls=True),
    ServerSpec("relay_haproxy", "HAProxy, mode tcp, nbthread 1",
               module="bench.servers.haproxy_relay", relays_to="c_epoll", tls=True),
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
#: The reference of the relay scenarios (r, rt), and the relay held to their targets.
RELAY_REFERENCE = "relay_haproxy"
RELAY_HELD_TO_TARGETS = "relay_portside"
RELAY_SCENARIO = "r"
TLS_RELAY_SCENARIO = "rt"
RELAY_SCENARIOS = (RELAY_SCENARIO, TLS_RELAY_SCENARIO)
#: The TLS echo scenarios: (t) persistent at 64 B and 4 KiB, (h) full and resumed handshakes.
TLS_ECHO_SCENARIOS = ("t64", "t4k", "hfull", "hresume")
TLS_SCENARIOS = (*TLS_ECHO_SCENARIOS, TLS_RELAY_SCENARIO)


def takes_part(server: str, scenario: str) -> bool:
    """Whether ``server`` is measured in ``scenario``: relays only in (r) and (rt), and only
    relays; the TLS scenarios only on the servers that serve TLS here; the slowloris
    scenario (e) only on portside's echo servers."""
    spec = SERVERS[server]
    if (spec.relays_to is not None) != (scenario in RELAY_SCENARIOS):
        return False
    if scenario in TLS_SCENARIOS and not spec.tls:
        return False
    return scenario != "e" or spec.is_portside


def references(scenario: str) -> tuple[str, ...]:
    """The servers a scenario's ratios are taken against (the C server speaks no TLS)."""
    if scenario in RELAY_SCENARIOS:
        return (RELAY_REFERENCE,)
    if scenario in TLS_SCENARIOS:
        return (UVLOOP_REFERENCE,)
    return (UVLOOP_REFERENCE, C_REFERENCE)
