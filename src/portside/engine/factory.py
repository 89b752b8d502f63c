"""The one place an engine is chosen and built: ``EngineKind``.

``choose_engine`` resolves the configured ``Engine`` (``auto``) once; ``EngineKind`` then knows
everything that differs between engines: its loop's style (portside's own epoll loop, run on
the calling thread, or an asyncio/uvloop loop), how to make that loop, and its listener, core
and pool classes. ``Server`` and ``IOPool`` ask it and never test the engine themselves.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import select
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from portside.config import Engine, ListenerConfig, ServerConfig
from portside.engine.core import EngineCore, Pools
from portside.engine.listener import Listener
from portside.engine.reactor import Reactor
from portside.errors import ConfigError

if TYPE_CHECKING:
    from portside.engine.asyncio_loop import AsyncioReactor
    from portside.handler import Handler

logger = logging.getLogger("portside")


def resolve_engine(engine: Engine) -> Engine:
    """``auto``: the compiled engine where it imports, else portside's own epoll loop in pure
    Python on Linux, else asyncio. Falling back is said once, in one log line."""
    if engine is Engine.COMPILED:
        from portside.engine import compiled

        if not compiled.available():
            raise ConfigError("the compiled engine is not available "
                              f"({compiled.reason_unavailable()}): use --engine epoll")
        return engine
    if engine is not Engine.AUTO:
        return engine
    if not hasattr(select, "epoll"):
        return Engine.ASYNCIO
    from portside.engine import compiled

    if compiled.available():
        return Engine.COMPILED
    global _fallback_reported
    if not _fallback_reported:
        _fallback_reported = True
        logger.warning("compiled engine unavailable (%s); using the pure-Python epoll engine",
                       compiled.reason_unavailable())
    return Engine.EPOLL


_fallback_reported = False


def choose_engine(engine: Engine, handlers: Iterable[Handler]) -> Engine:
    """The engine for a set of handlers: ``auto`` means an asyncio loop (uvloop where it is
    installed) as soon as one handler runs coroutines, since every listener of one engine runs
    on the same loop; plain handlers run on it unchanged. Otherwise as ``resolve_engine``."""
    if engine is Engine.AUTO and any(runs_coroutines(handler) for handler in handlers):
        return Engine.UVLOOP if importlib.util.find_spec("uvloop") else Engine.ASYNCIO
    return resolve_engine(engine)


def runs_coroutines(handler: Handler) -> bool:
    return bool(getattr(handler, "requires_asyncio", False))


class OwnLoop(Reactor, Protocol):
    """One of portside's own epoll loops: a reactor that runs on the calling thread."""

    def run(self) -> None: ...

    def close(self) -> None: ...


class EngineKind:
    """One resolved engine: its loop style and the classes it builds with."""

    __slots__ = ("compiled", "engine", "own_loop")

    def __init__(self, engine: Engine) -> None:
        if engine is Engine.AUTO:
            raise ValueError("resolve the engine first (choose_engine)")
        self.engine = engine
        #: Its hot paths are compiled (``_compiled.pyx``).
        self.compiled = engine is Engine.COMPILED
        #: Runs portside's own epoll loop on the calling thread (else an asyncio loop).
        self.own_loop = engine in (Engine.EPOLL, Engine.COMPILED)

    @classmethod
    def choose(cls, engine: Engine, handlers: Iterable[Handler]) -> EngineKind:
        return cls(choose_engine(engine, handlers))

    def check(self, handlers: Iterable[Handler]) -> None:
        """A handler that runs coroutines on an epoll engine named explicitly: one clear
        error."""
        if self.own_loop:
            for handler in handlers:
                if runs_coroutines(handler):
                    raise ConfigError(f"{type(handler).__name__} runs coroutines: use the "
                                      "asyncio or uvloop engine (every listener of one engine "
                                      "shares it)")

    def new_loop(self) -> OwnLoop:
        """A new loop of one of portside's own epoll engines (``own_loop``)."""
        if self.compiled:
            from portside.engine import compiled

            loop: OwnLoop = compiled.Loop()
            return loop
        from portside.engine.epoll import EpollReactor

        return EpollReactor()

    def loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        """What ``asyncio.Runner`` makes the loop with (not ``own_loop``): uvloop's, or None
        for asyncio's own."""
        if self.engine is not Engine.UVLOOP:
            return None
        try:
            import uvloop
        except ImportError:
            raise ConfigError("the uvloop engine needs the uvloop package "
                              "(pip install 'portside[uvloop]')") from None
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory

    def asyncio_reactor(self, loop: asyncio.AbstractEventLoop) -> AsyncioReactor:
        """The reactor over a running asyncio (or uvloop) loop (not ``own_loop``)."""
        from portside.engine.asyncio_loop import AsyncioReactor

        return AsyncioReactor(loop)

    def listener(self, config: ListenerConfig, sock: socket.socket,
                 owned: bool = True) -> Listener:
        if self.compiled:
            from portside.engine import compiled

            return compiled.CompiledListener(config, sock, owned=owned)
        return Listener(config, sock, owned=owned)

    def pools(self, config: ServerConfig) -> Pools:
        """The buffer and connection pools of one loop, however many servers it runs."""
        return Pools(config, compiled=self.compiled)

    def core(self, reactor: Reactor, handler: Handler | None, config: ServerConfig,
             on_idle: Callable[[], None], pools: Pools) -> EngineCore:
        """One server's share of the engine."""
        core_class: type[EngineCore] = EngineCore
        if self.compiled:
            from portside.engine import compiled

            core_class = compiled.CompiledCore
        return core_class(reactor, handler, config, on_idle=on_idle, compiled=self.compiled,
                          pools=pools)

    def __repr__(self) -> str:
        return f"<EngineKind {self.engine.value}>"
