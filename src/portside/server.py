"""Server: binds the listeners, runs an engine over all of them, and ends cleanly.

Life cycle: new -> started (sockets bound, so "port in use" surfaces before anything runs) ->
running -> draining (graceful shutdown) -> stopped. Shutdown stops accepting, closes pending
data-first connections, lets the others finish their conversation until ``drain_timeout``, then
closes what is left with FIN, and after ``linger_timeout`` more resets whatever still remains. Every
connection gets ``connection_closed``; the handler's ``server_stopped`` comes last.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import importlib.util
import logging
import select
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import FrameType
from typing import Any, Protocol

from portside.config import Engine, ListenerConfig, ServerConfig
from portside.engine.buffers import PoolStatistics
from portside.engine.connection import CloseReason, Connection
from portside.engine.core import EngineCore
from portside.engine.epoll import EpollReactor
from portside.engine.listener import Listener, bind_listener
from portside.engine.outbound import DEFAULT_CONNECT_TIMEOUT, ConnectAttempt
from portside.engine.reactor import Reactor, TimerHandle
from portside.errors import ConfigError, ServerStateError
from portside.handler import Handler
from portside.statistics import ServerStatistics

logger = logging.getLogger("portside")

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LAG_PROBE_INTERVAL = 0.5  # seconds between loop-lag probes


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


class Service(Protocol):
    """Something else that runs on the server's loop, like the control socket."""

    def attach(self, reactor: Reactor) -> None: ...

    def close(self) -> None: ...


class ServerState(enum.Enum):
    NEW = "new"
    STARTED = "started"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Server:
    """One handler, any number of listeners, one engine: the seed's socket server class.

    Resource handling: ``start()`` binds every listener (or none: a failure closes the ones
    already bound). ``run()`` serves until shutdown and then releases every socket it made.
    Error handling: bind failures raise ``ListenError`` with a one-line message; exceptions from
    handler callbacks are reported to ``Handler.error`` and close only their connection.
    """

    def __init__(self, handler: Handler, listeners: Iterable[ListenerConfig],
                 config: ServerConfig | None = None,
                 sockets: Sequence[socket.socket] | None = None) -> None:
        """``sockets``, if given, are already listening (one per listener, in order), shared
        with other processes: the server serves them instead of binding its own."""
        self.handler = handler
        self.listener_configs = tuple(listeners)
        if not self.listener_configs:
            raise ConfigError("a server needs at least one listener")
        if sockets is not None and len(sockets) != len(self.listener_configs):
            raise ConfigError("give exactly one listening socket per listener")
        self._given_sockets = tuple(sockets) if sockets is not None else None
        self._services: list[Service] = []
        self.config = config or ServerConfig()
        self.state = ServerState.NEW
        #: Set once every listener accepts; other threads may wait on it.
        self.started = threading.Event()
        #: Set once the server has stopped and released its sockets.
        self.stopped = threading.Event()
        self._listeners: list[Listener] = []
        self._core: EngineCore | None = None
        self._reactor: Reactor | None = None
        self._accepting_paused = False
        self._drain_timer: TimerHandle | None = None
        self._signals_seen = 0
        self._shutdown_requested: tuple[float | None] | None = None
        self.loop_lag = self.loop_lag_max = 0.0

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener now, so that address errors surface before serving begins."""
        if self.state is not ServerState.NEW:
            return
        if self._given_sockets is not None:
            for listener_config, sock in zip(self.listener_configs, self._given_sockets,
                                             strict=True):
                sock.setblocking(False)
                self._listeners.append(self._listener_class(listener_config, sock, owned=False))
            self.state = ServerState.STARTED
            return
        try:
            for listener_config in self.listener_configs:
                sock = bind_listener(listener_config)
                self._listeners.append(self._listener_class(listener_config, sock))
        except BaseException:
            for listener in self._listeners:
                listener.close()
            self._listeners.clear()
            raise
        self.state = ServerState.STARTED

    def add_service(self, service: Service) -> None:
        """Run ``service`` on this server's loop while it runs (the control socket, say)."""
        self._services.append(service)
        if self._reactor is not None and self.state is ServerState.RUNNING:
            service.attach(self._reactor)

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The bound listeners (after ``start()``), in the order they were configured."""
        return tuple(self._listeners)

    def run(self, install_signal_handlers: bool = True) -> None:
        """Serve on the configured engine until shutdown; blocks the calling thread.

        With ``install_signal_handlers`` (and on the main thread), SIGINT and SIGTERM start a
        graceful shutdown, and a second one forces it.
        """
        self.start()
        engine = self.engine
        if engine in (Engine.EPOLL, Engine.COMPILED) and \
                getattr(self.handler, "requires_asyncio", False):
            raise ConfigError(f"{type(self.handler).__name__} runs coroutines: use the asyncio "
                              "or uvloop engine")
        if engine in (Engine.EPOLL, Engine.COMPILED):
            self._run_epoll(install_signal_handlers)
        elif engine is Engine.ASYNCIO:
            with asyncio.Runner() as runner:
                runner.run(self._serve(install_signal_handlers))
        else:
            try:
                import uvloop
            except ImportError:
                raise ConfigError("the uvloop engine needs the uvloop package "
                                  "(pip install 'portside[uvloop]')") from None
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._serve(install_signal_handlers))

    @functools.cached_property
    def engine(self) -> Engine:
        """The engine ``run()`` uses: the configured one, with ``auto`` resolved (for a handler
        that runs coroutines, ``auto`` means an asyncio loop: uvloop where it is installed).
        Resolved once: statistics ask for it every second."""
        if self.config.engine is Engine.AUTO and getattr(self.handler, "requires_asyncio", False):
            return Engine.UVLOOP if importlib.util.find_spec("uvloop") else Engine.ASYNCIO
        return resolve_engine(self.config.engine)

    @property
    def _listener_class(self) -> type[Listener]:
        if self.engine is Engine.COMPILED:
            from portside.engine import compiled

            return compiled.CompiledListener
        return Listener

    async def serve(self, install_signal_handlers: bool = False,
                    shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> None:
        """Serve from the running asyncio (or uvloop) loop until shutdown completes.

        With ``install_signal_handlers`` (on the main thread), SIGINT and SIGTERM start a
        graceful shutdown, and a second one forces it. ``shutdown_trigger``, as in hypercorn's
        ``serve()``: a graceful shutdown starts when the awaitable it returns completes (an
        ``asyncio.Event().wait``, say). Otherwise call ``shutdown()``.
        """
        trigger: asyncio.Task[object] | None = None
        if shutdown_trigger is not None:
            async def watch() -> object:
                result = await shutdown_trigger()
                self.shutdown()
                return result
            trigger = asyncio.ensure_future(watch())
        try:
            await self._serve(install_signal_handlers)
        finally:
            if trigger is not None and not trigger.done():
                trigger.cancel()

    def _run_epoll(self, install_signal_handlers: bool) -> None:
        reactor: Any
        if self.engine is Engine.COMPILED:
            from portside.engine import compiled

            reactor = compiled.Loop()
        else:
            reactor = EpollReactor()
        previous: dict[signal.Signals, object] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            def on_signal(signum: int, frame: FrameType | None) -> None:
                reactor.call_soon_threadsafe(lambda: self._on_shutdown_signal(signum))
            for signum in _SHUTDOWN_SIGNALS:  # SIGHUP is the application's (or a supervisor's)
                previous[signum] = signal.signal(signum, on_signal)
        try:
            self._begin(reactor)
            reactor.run()
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)  # type: ignore[arg-type]
            self._release()  # before the loop closes: services unregister from it
            reactor.close()

    async def _serve(self, install_signal_handlers: bool) -> None:
        from portside.engine.asyncio_loop import AsyncioReactor

        self.start()
        loop = asyncio.get_running_loop()
        reactor = AsyncioReactor(loop)
        handled: list[signal.Signals] = []
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for signum in _SHUTDOWN_SIGNALS:
                loop.add_signal_handler(signum, self._on_shutdown_signal, signum)
                handled.append(signum)
        try:
            self._begin(reactor)
            await reactor.stopped.wait()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            self._release()

    def _begin(self, reactor: Reactor) -> None:
        if self.state is not ServerState.STARTED:
            raise ServerStateError(f"cannot run a server that is {self.state.value}")
        self._reactor = reactor
        core_class: type[EngineCore] = EngineCore
        if self.engine is Engine.COMPILED:
            from portside.engine import compiled

            core_class = compiled.CompiledCore
        self._core = core_class(reactor, self.handler, self.config, on_idle=self._on_idle,
                                compiled=self.engine is Engine.COMPILED)
        for listener in self._listeners:
            if self._accepting_paused:
                listener.paused = True
            listener.attach(self._core)
        self.state = ServerState.RUNNING
        self._probe_loop_lag(reactor.time() + _LAG_PROBE_INTERVAL)
        for service in self._services:
            service.attach(reactor)
        for listener in self._listeners:
            logger.info("listening on %s (%s)", listener.address, listener.config.policy.value)
        self._call_handler(self.handler.server_started)
        self.started.set()
        if self._shutdown_requested is not None:  # asked for before the loop existed
            reactor.call_soon(lambda: self._shutdown(*self._shutdown_requested or (None,)))

    def _probe_loop_lag(self, expected: float) -> None:
        """A timer that notes how late it runs: the loop's lag, for statistics and metrics."""
        reactor = self._reactor
        if reactor is None or self.state is ServerState.STOPPED:
            return
        self.loop_lag = max(0.0, reactor.time() - expected)
        self.loop_lag_max = max(self.loop_lag_max, self.loop_lag)
        due = reactor.time() + _LAG_PROBE_INTERVAL
        reactor.call_later(_LAG_PROBE_INTERVAL, lambda: self._probe_loop_lag(due))

    def _release(self) -> None:
        for listener in self._listeners:
            listener.close()
        if self._core is not None:
            self._core.close_outbound()
        for service in self._services:
            try:
                service.close()
            except Exception:
                logger.exception("closing %r failed", service)
        if self.state is not ServerState.STOPPED:
            self.state = ServerState.STOPPED
        self.stopped.set()

    # -- control (thread-safe) -------------------------------------------------------------------

    def call_soon_threadsafe(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` on the server's loop; the way other threads touch connections."""
        if self._reactor is None:
            raise ServerStateError("the server is not running")
        self._reactor.call_soon_threadsafe(callback)

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Begin a graceful shutdown (from any thread); ``drain_timeout`` overrides the config.

        Asked before the server runs, it takes effect as soon as it starts."""
        self._shutdown_requested = (drain_timeout,)
        self._on_loop(lambda: self._shutdown(drain_timeout))

    def pause_accepting(self) -> None:
        """Stop accepting on every listener; live connections go on being served."""
        self._accepting_paused = True
        self._on_loop(lambda: self._each_listener(Listener.pause))

    def resume_accepting(self) -> None:
        """Accept again; connections that waited in the kernel's backlog are then served."""
        self._accepting_paused = False
        self._on_loop(lambda: self._each_listener(Listener.resume))

    def _each_listener(self, action: Callable[[Listener], None]) -> None:
        for listener in self._listeners:
            action(listener)

    def _on_loop(self, action: Callable[[], object]) -> None:
        reactor = self._reactor
        if reactor is None or self.state is ServerState.STOPPED:
            return  # not running: the flags set by the caller take effect when it runs
        if reactor.in_loop_thread():
            action()
        else:
            reactor.call_soon_threadsafe(action)

    def connect(self, host: str, port: int, handler: Handler, *,
                timeout: float = DEFAULT_CONNECT_TIMEOUT, user_data: Any = None,
                config: ListenerConfig | None = None) -> ConnectAttempt:
        """Open an outbound TCP connection on this server's engine (from any thread; the
        attempt starts on the loop). ``handler`` gets ``connection_made(conn, None)`` and then
        the usual callbacks, or ``connect_failed(attempt, exc)`` once instead; ``conn.user_data``
        is ``user_data`` from the start. ``config``'s per-connection policies apply (write
        water marks, write_limit, idle and write timeouts); its listening fields do not.

        Resource handling: the connection is the server's like an accepted one: shutdown
        closes it (``connection_closed`` comes for every one), and fails connects under way.
        Error handling: a bad ``timeout`` raises ConfigError; a server that is not running
        raises ServerStateError; everything else reaches ``connect_failed``.
        """
        return self._connect(handler, host, port, None, timeout, user_data, config)

    def connect_unix(self, path: str, handler: Handler, *,
                     timeout: float = DEFAULT_CONNECT_TIMEOUT, user_data: Any = None,
                     config: ListenerConfig | None = None) -> ConnectAttempt:
        """``connect`` to a Unix-domain socket at ``path``."""
        return self._connect(handler, None, 0, path, timeout, user_data, config)

    def _connect(self, handler: Handler, host: str | None, port: int, path: str | None,
                 timeout: float, user_data: Any,
                 config: ListenerConfig | None) -> ConnectAttempt:
        core = self._core
        if core is None or self.state not in (ServerState.RUNNING, ServerState.DRAINING):
            raise ServerStateError(f"cannot connect from a server that is {self.state.value}")
        return core.connector(config).connect(handler, host, port, path, timeout, user_data)

    def connections(self) -> list[Connection]:
        """Live connections, pending ones included (call on the loop thread)."""
        return self._core.live() if self._core is not None else []

    def statistics(self) -> ServerStatistics:
        """A frozen snapshot of every listener's counters and the pools."""
        empty = PoolStatistics(0, 0, 0, 0, 0, 0, 0)
        core = self._core
        return ServerStatistics(
            state=self.state.value,
            engine=self.engine.value,
            accepting_paused=self._accepting_paused,
            loop_lag=self.loop_lag,
            loop_lag_max=self.loop_lag_max,
            listeners=tuple(listener.statistics() for listener in self._listeners),
            buffer_pool=core.buffers.statistics() if core else empty,
            connection_pool=core.connections.statistics() if core else empty,
            # A copy first (one C call): another thread's connect() may add a connector.
            outbound=tuple(connector.statistics() for connector in list(core.connectors.values()))
            if core else (),
        )

    # -- shutdown --------------------------------------------------------------------------------

    def _on_shutdown_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self._signals_seen += 1
        if self._signals_seen == 1:
            logger.info("%s: shutting down gracefully (again to force)", name)
            self._shutdown(None)
        else:
            logger.info("%s: forcing shutdown", name)
            self._force_close()

    def _shutdown(self, drain_timeout: float | None) -> None:
        if self.state is not ServerState.RUNNING:
            return
        core = self._core
        reactor = self._reactor
        assert core is not None and reactor is not None
        self.state = ServerState.DRAINING
        for listener in self._listeners:
            listener.close()  # connections it takes from the backlog are live, and pending
        core.close_outbound()
        # Accepting has stopped (as the callback's contract says); it may close connections.
        self._call_handler(self.handler.shutdown_started)
        if self.state is not ServerState.DRAINING:
            return  # the handler closed everything: the server has already stopped
        for conn in core.live():
            # A data-first connection is not accepted until it speaks: close it now. One that
            # is pending only while its PROXY header or TLS handshake arrives was accepted
            # (immediate policy): it drains like the others, its first-data deadline running.
            if conn.is_pending and conn.listener.data_first:
                conn.close_for(CloseReason.SHUTDOWN)
        if not core.open:
            self._finish()
        if self.state is not ServerState.DRAINING:
            return
        drain = self.config.drain_timeout if drain_timeout is None else drain_timeout
        logger.info("draining %d connection(s) for up to %g s", core.open, drain)
        self._drain_timer = reactor.call_later(drain, self._drain_expired)

    def _drain_expired(self) -> None:
        core, reactor = self._core, self._reactor
        assert core is not None and reactor is not None
        for conn in core.live():
            conn.close_for(CloseReason.SHUTDOWN)
        if self.state is ServerState.DRAINING:
            self._drain_timer = reactor.call_later(self.config.linger_timeout, self._force_close)

    def _force_close(self) -> None:
        core = self._core
        if core is None:
            return
        if self.state is ServerState.RUNNING:
            self._shutdown(0.0)
        for conn in core.live():
            conn.abort_for(CloseReason.SHUTDOWN)
        if self.state is ServerState.DRAINING and not core.open:
            self._finish()

    def _on_idle(self) -> None:
        if self.state is ServerState.DRAINING:
            self._finish()

    def _finish(self) -> None:
        if self.state is not ServerState.DRAINING:
            return
        self.state = ServerState.STOPPED
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._call_handler(self.handler.server_stopped)
        assert self._reactor is not None
        self._reactor.stop()

    def _call_handler(self, callback: Callable[[Server], None]) -> None:
        try:
            callback(self)
        except Exception as exc:
            assert self._core is not None
            self._core.report_error(None, exc)
