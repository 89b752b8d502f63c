"""Server: binds the listeners, runs an engine over all of them, and ends cleanly.

Life cycle: new -> started (sockets bound, so "port in use" surfaces before anything runs) ->
running -> draining (graceful shutdown) -> stopped. Shutdown stops accepting, closes pending
data-first connections, lets the others finish their conversation until ``drain_timeout``, then
closes what is left with FIN, and after ``linger_timeout`` more resets whatever still remains. Every
connection gets ``connection_closed``; the handler's ``server_stopped`` comes last.

Several protocols, one engine. Each listener may have its own handler (``ListenerConfig.handler``;
the server's is the default); the server-level callbacks go once to each distinct handler. Several
servers may share one engine, an ``IOPool``: one loop thread, one buffer pool, one pool of
connection objects, while each server keeps its listeners, handlers, statistics, pausing and
shutdown. The pool's loop ends when its last server has stopped.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import FrameType
from typing import Any, Protocol

from portside.config import Engine, ListenerConfig, ServerConfig
from portside.connection import ConnectAttempt, Connection, ListenerView
from portside.engine.buffers import PoolStatistics
from portside.engine.connection import Connection as EngineConnection
from portside.engine.core import EngineCore, Pools
from portside.engine.factory import EngineKind
from portside.engine.factory import choose_engine as choose_engine
from portside.engine.factory import resolve_engine as resolve_engine
from portside.engine.listener import Listener, bind_listener
from portside.engine.outbound import DEFAULT_CONNECT_TIMEOUT
from portside.engine.reactor import Reactor, TimerHandle
from portside.errors import ConfigError, ServerStateError
from portside.handler import Handler
from portside.reasons import CloseReason
from portside.statistics import ServerStatistics, UpstreamStatistics

logger = logging.getLogger("portside")

_SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_LAG_PROBE_INTERVAL = 0.5  # seconds between loop-lag probes


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
    """A handler, any number of listeners, one engine: the seed's socket server class.

    Resource handling: ``start()`` binds every listener (or none: a failure closes the ones
    already bound). ``run()`` serves until shutdown and then releases every socket it made.
    Error handling: bind failures raise ``ListenError`` with a one-line message; exceptions from
    handler callbacks are reported to that handler's ``error`` and close only their connection.
    """

    def __init__(self, handler: Handler | None, listeners: Iterable[ListenerConfig],
                 config: ServerConfig | None = None,
                 sockets: Sequence[socket.socket] | None = None,
                 io_pool: IOPool | None = None) -> None:
        """``handler`` serves every listener whose config names no handler of its own (it may
        be None when each does). ``sockets``, if given, are already listening (one per
        listener, in order), shared with other processes: the server serves them instead of
        binding its own. ``io_pool``: run on that shared engine (``IOPool.run``) instead of
        one of the server's own."""
        self.handler = handler
        self.listener_configs = tuple(listeners)
        if not self.listener_configs:
            raise ConfigError("a server needs at least one listener")
        for listener_config in self.listener_configs:
            own = listener_config.handler
            if isinstance(own, str):
                raise ConfigError(f"the handler of {listener_config.description} is the text "
                                  f"{own!r}: give a Handler instance (the command line imports "
                                  "it with portside.workers.app.load_listener_handlers)")
            if own is None and handler is None:
                raise ConfigError(f"{listener_config.description} has no handler: give the "
                                  "server one, or the listener its own")
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
        self._announcing = False  # shutdown_started is being called: do not finish meanwhile
        self.loop_lag = self.loop_lag_max = 0.0
        self._io_pool = io_pool
        self._solo = False  # io_pool is the one-server pool run() made
        if io_pool is not None:
            io_pool._add(self)
        self._upstream_sources: list[Callable[[], Iterable[UpstreamStatistics]]] = []

    @property
    def handlers(self) -> tuple[Handler, ...]:
        """Every distinct handler this server runs: its own, then the listeners' own, in order
        (the server-level callbacks go once to each)."""
        found: list[Handler] = []
        for handler in (self.handler, *(config.handler for config in self.listener_configs)):
            if handler is None or isinstance(handler, str):
                continue  # none, or text refused by the constructor
            if not any(handler is seen for seen in found):
                found.append(handler)
        return tuple(found)

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener now, so that address errors surface before serving begins."""
        if self.state is not ServerState.NEW:
            return
        if self._given_sockets is not None:
            for listener_config, sock in zip(self.listener_configs, self._given_sockets,
                                             strict=True):
                sock.setblocking(False)
                self._listeners.append(self._kind.listener(listener_config, sock, owned=False))
            self.state = ServerState.STARTED
            if self._io_pool is not None:
                self._io_pool._join(self)
            return
        try:
            for listener_config in self.listener_configs:
                sock = bind_listener(listener_config)
                self._listeners.append(self._kind.listener(listener_config, sock))
        except BaseException:
            for listener in self._listeners:
                listener.close()
            self._listeners.clear()
            raise
        self.state = ServerState.STARTED
        if self._io_pool is not None:
            self._io_pool._join(self)

    def add_upstream_statistics(self, source: Callable[[], Iterable[UpstreamStatistics]]
                                ) -> None:
        """Report upstream servers in ``statistics()`` (so in ctl, metrics and top): a relay's
        handler calls this from ``server_started``; ``source`` is called on the loop."""
        self._upstream_sources.append(source)

    def add_service(self, service: Service) -> None:
        """Run ``service`` on this server's loop while it runs (the control socket, say)."""
        self._services.append(service)
        if self._reactor is not None and self.state is ServerState.RUNNING:
            service.attach(self._reactor)

    @property
    def listeners(self) -> tuple[ListenerView, ...]:
        """The bound listeners (after ``start()``), in the order they were configured."""
        return tuple(self._listeners)

    @property
    def _engine_listeners(self) -> tuple[Listener, ...]:
        """The engine's listeners, for the layers above the server (control, the CLI)."""
        return tuple(self._listeners)

    def _live(self) -> list[EngineConnection]:
        """The engine's live connections, for the layers above the server (control)."""
        return self._core.live() if self._core is not None else []

    def run(self, install_signal_handlers: bool = True) -> None:
        """Serve on the configured engine until shutdown; blocks the calling thread.

        With ``install_signal_handlers`` (and on the main thread), SIGINT and SIGTERM start a
        graceful shutdown, and a second one forces it.
        """
        self._solo_pool().run(install_signal_handlers)

    def _solo_pool(self) -> IOPool:
        """The one-server ``IOPool`` that ``run``/``serve`` run this server on: one way to run
        an engine, whether it serves one server or several."""
        if self._io_pool is not None and not self._solo:
            raise ServerStateError("this server runs on an IOPool: run the pool, not the server")
        if self.state not in (ServerState.NEW, ServerState.STARTED):
            raise ServerStateError(f"cannot run a server that is {self.state.value}")
        pool = IOPool(self.config)
        pool._chosen = self._kind
        self._io_pool, self._solo = pool, True
        pool._add(self)
        return pool

    @functools.cached_property
    def engine(self) -> Engine:
        """The engine ``run()`` uses: the configured one, with ``auto`` resolved (when one of
        the handlers runs coroutines, ``auto`` means an asyncio loop: uvloop where it is
        installed); on an ``IOPool``, the pool's. Resolved once: statistics ask every second."""
        return self._kind.engine

    @functools.cached_property
    def _kind(self) -> EngineKind:
        """The engine, chosen once: what builds its listeners, core and loop."""
        if self._io_pool is not None:
            return self._io_pool._kind
        return EngineKind.choose(self.config.engine, self.handlers)

    async def serve(self, install_signal_handlers: bool = False,
                    shutdown_trigger: Callable[[], Awaitable[object]] | None = None) -> None:
        """Serve from the running asyncio (or uvloop) loop until shutdown completes.

        With ``install_signal_handlers`` (on the main thread), SIGINT and SIGTERM start a
        graceful shutdown, and a second one forces it. ``shutdown_trigger``, as in hypercorn's
        ``serve()``: a graceful shutdown starts when the awaitable it returns completes (an
        ``asyncio.Event().wait``, say). Otherwise call ``shutdown()``.
        """
        pool = self._solo_pool()
        trigger: asyncio.Task[object] | None = None
        if shutdown_trigger is not None:
            async def watch() -> object:
                result = await shutdown_trigger()
                self.shutdown()
                return result
            trigger = asyncio.ensure_future(watch())
        try:
            await pool.serve(install_signal_handlers)
        finally:
            if trigger is not None and not trigger.done():
                trigger.cancel()

    def _begin(self, reactor: Reactor, pools: Pools) -> None:
        """Serve on ``reactor`` with its engine's ``pools`` (shared by an IOPool's servers)."""
        if self.state is not ServerState.STARTED:
            raise ServerStateError(f"cannot run a server that is {self.state.value}")
        self._reactor = reactor
        self._core = self._kind.core(reactor, self.handler, self.config, self._on_idle, pools)
        for listener in self._listeners:
            if self._accepting_paused:
                listener.paused = True
            listener.attach(self._core)
        self.state = ServerState.RUNNING
        self._probe_loop_lag(reactor.time() + _LAG_PROBE_INTERVAL)
        for service in self._services:
            service.attach(reactor)
        several = len(self.handlers) > 1  # then each line names the listener's handler
        for listener in self._listeners:
            logger.info("listening on %s (%s)%s", listener.address, listener.config.policy.value,
                        f" for {type(listener.handler).__name__}" if several else "")
        self._call_handlers("server_started")
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
        if self.stopped.is_set():
            return  # released already (a server on an IOPool releases as it stops)
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
        """Run ``callback`` on the server's loop; the way other threads touch connections.
        Raises ServerStateError before the server runs and after it stopped."""
        if self._reactor is None or self.state is ServerState.STOPPED:
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
                config: ListenerConfig | None = None, tls: ssl.SSLContext | bool | None = None,
                server_hostname: str | None = None, preamble: bytes = b"") -> ConnectAttempt:
        """Open an outbound TCP connection on this server's engine (from any thread; the
        attempt starts on the loop). ``handler`` gets ``connection_made(conn, None)`` and then
        the usual callbacks, or ``connect_failed(attempt, exc)`` once instead; ``conn.user_data``
        is ``user_data`` from the start. ``config``'s per-connection policies apply (write
        water marks, write_limit, idle and write timeouts); its listening fields do not.

        TLS: ``tls`` (a client-side ``SSLContext``; True for ``ssl.create_default_context()``;
        default: ``config.tls``) makes the connection speak TLS. The server's certificate and
        name are checked as the context says (by default: verified against the system's CAs,
        and ``server_hostname``, default ``host``, is sent as SNI and must match). The
        handshake is part of connecting: ``connection_made`` comes once it is done
        (``conn.tls`` then has the peer's certificate and ALPN), and ``timeout`` covers it.
        ``preamble`` is sent in the clear first (a PROXY header, before any TLS record).

        Resource handling: the connection is the server's like an accepted one: shutdown
        closes it (``connection_closed`` comes for every one), and fails connects under way.
        Error handling: a bad ``timeout`` or a server-side ``tls`` context raises ConfigError;
        a server that is not running raises ServerStateError; everything else (refused,
        timed out, a bad certificate, a wrong host name, a failed handshake) reaches
        ``connect_failed``.
        """
        return self._connect(handler, host, port, None, timeout, user_data, config, tls,
                             server_hostname, preamble)

    def connect_unix(self, path: str, handler: Handler, *,
                     timeout: float = DEFAULT_CONNECT_TIMEOUT, user_data: Any = None,
                     config: ListenerConfig | None = None,
                     tls: ssl.SSLContext | bool | None = None,
                     server_hostname: str | None = None,
                     preamble: bytes = b"") -> ConnectAttempt:
        """``connect`` to a Unix-domain socket at ``path`` (with ``tls``, ``server_hostname``
        is required when the context checks names)."""
        return self._connect(handler, None, 0, path, timeout, user_data, config, tls,
                             server_hostname, preamble)

    def _connect(self, handler: Handler, host: str | None, port: int, path: str | None,
                 timeout: float, user_data: Any, config: ListenerConfig | None,
                 tls: ssl.SSLContext | bool | None, server_hostname: str | None,
                 preamble: bytes) -> ConnectAttempt:
        core = self._core
        if core is None or self.state not in (ServerState.RUNNING, ServerState.DRAINING):
            raise ServerStateError(f"cannot connect from a server that is {self.state.value}")
        return core.connector(config).connect(handler, host, port, path, timeout, user_data,
                                              tls, server_hostname, preamble)

    def connections(self) -> list[Connection]:
        """Live connections, pending ones included (call on the loop thread)."""
        return list(self._core.live()) if self._core is not None else []

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
            connection_pool=core.connection_pool.statistics() if core else empty,
            # A copy first (one C call): another thread's connect() may add a connector.
            outbound=tuple(connector.statistics() for connector in list(core.connectors.values()))
            if core else (),
            upstreams=tuple(entry for source in self._upstream_sources for entry in source()),
        )

    # -- shutdown --------------------------------------------------------------------------------

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
        # Accepting has stopped (as the callback's contract says); it may close connections,
        # but the server finishes only once every handler has heard.
        self._announcing = True
        try:
            self._call_handlers("shutdown_started")
        finally:
            self._announcing = False
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
            try:
                conn.abort_for(CloseReason.SHUTDOWN)
            except Exception:  # a bug in portside: the others are still aborted
                logger.exception("internal error aborting %r at a forced shutdown", conn)
        # Forced means the server stops now, whatever the count of open connections says: a
        # count that a bug left wrong must not keep the process alive (see
        # EngineCore.finished_twice).
        if core.open:
            logger.error("internal error: %d connection(s) still counted open after every "
                         "one was aborted; stopping anyway", core.open)
        self._finish()

    def _on_idle(self) -> None:
        if self.state is ServerState.DRAINING and not self._announcing:
            self._finish()

    def _finish(self) -> None:
        if self.state is not ServerState.DRAINING:
            return
        self.state = ServerState.STOPPED
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._call_handlers("server_stopped")
        # Released now: the loop goes on while the pool has other servers (a server's own
        # one-server pool then ends its loop).
        self._release()
        assert self._io_pool is not None
        self._io_pool._server_stopped()

    def _call_handlers(self, callback: str) -> None:
        """A server-level callback, once for each distinct handler; what one raises goes to
        that handler's ``error``."""
        for handler in self.handlers:
            try:
                getattr(handler, callback)(self)
            except Exception as exc:
                assert self._core is not None
                self._core.report_error(None, exc, handler=handler)


class IOPool:
    """One engine that several servers share: one loop thread, one buffer pool, one pool of
    connection objects (the article's single IO pool for several servers).

    Make the pool, then each ``Server(..., io_pool=pool)``, then ``pool.run()``. Each server
    keeps its own listeners, handlers, statistics, ``pause_accepting``/``resume_accepting``
    and ``shutdown``: shutting one down drains its connections only, while the others serve
    on. The pool's ``config`` chooses the engine and sizes the pools (a server's own
    ``buffer_size`` and pool sizes are not used; its drain, linger, back-off and logging
    settings are). A server made (or started) while the pool runs joins the running loop.

    Resource handling: ``run()`` binds every server's listeners (or none), serves until the
    last server has stopped (one by one, or all with ``shutdown()``), then releases every
    socket and the loop. Error handling: as ``Server``; a server that names an engine other
    than the pool's is a ``ConfigError``.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        #: Set once the loop runs and every server attached by then serves.
        self.started = threading.Event()
        #: Set once the loop has ended and released everything.
        self.stopped = threading.Event()
        self._servers: list[Server] = []
        self._chosen: EngineKind | None = None
        self._reactor: Reactor | None = None
        self._pools: Pools | None = None
        self._stopping = False
        self._lock = threading.Lock()  # servers join from any thread
        self._signals_seen = 0

    @property
    def servers(self) -> tuple[Server, ...]:
        return tuple(self._servers)

    @property
    def engine(self) -> Engine:
        """The pool's engine, resolved once, at first need, over the handlers of the servers
        attached by then (``auto`` picks an asyncio loop if one of them runs coroutines)."""
        return self._kind.engine

    @property
    def _kind(self) -> EngineKind:
        """The engine, chosen once: what builds the loop, the pools and each server's core."""
        if self._chosen is None:
            self._chosen = EngineKind.choose(self.config.engine, [
                handler for server in self._servers for handler in server.handlers])
        return self._chosen

    def _add(self, server: Server) -> None:
        """A new server (from its constructor)."""
        if self.stopped.is_set() or self._stopping:
            raise ServerStateError("this IOPool has stopped")
        named = server.config.engine
        if named is not Engine.AUTO and named is not self.config.engine:
            raise ConfigError(f"a server on an IOPool runs on the pool's engine "
                              f"({self.config.engine.value}), not {named.value}")
        if self._chosen is not None:
            self._chosen.check(server.handlers)
        self._servers.append(server)

    def _join(self, server: Server) -> None:
        """A server has bound its listeners: serve it now if the loop runs (else ``run``
        will)."""
        with self._lock:
            reactor, pools = self._reactor, self._pools
            if reactor is None or pools is None:
                return
            if self._stopping:
                for listener in server._listeners:
                    listener.close()
                raise ServerStateError("this IOPool is stopping")
            self._kind.check(server.handlers)
            reactor.call_soon_threadsafe(lambda: self._begin(server))

    def _begin(self, server: Server) -> None:
        """Serve ``server`` on the loop, unless it is serving already (``_open`` and ``_join``
        may both have seen it started) or has stopped meanwhile."""
        if server.state is ServerState.STARTED and not self._stopping:
            assert self._reactor is not None and self._pools is not None
            server._begin(self._reactor, self._pools)

    # -- running ---------------------------------------------------------------------------------

    def run(self, install_signal_handlers: bool = True) -> None:
        """Serve every server on one loop until the last has stopped; blocks the calling
        thread. With ``install_signal_handlers`` (and on the main thread), SIGINT and SIGTERM
        shut every server down gracefully, and a second one forces it."""
        kind = self._prepare()
        if kind.own_loop:
            self._run_own_loop(kind, install_signal_handlers)
            return
        with asyncio.Runner(loop_factory=kind.loop_factory()) as runner:
            runner.run(self._serve(install_signal_handlers))

    async def serve(self, install_signal_handlers: bool = False) -> None:
        """Serve every server from the running asyncio (or uvloop) loop until the last has
        stopped."""
        self._prepare()
        await self._serve(install_signal_handlers)

    def _prepare(self) -> EngineKind:
        if self._reactor is not None or self.stopped.is_set():
            raise ServerStateError("an IOPool runs once")
        if not self._servers:
            raise ConfigError("an IOPool needs at least one server")
        kind = self._kind
        for server in self._servers:
            kind.check(server.handlers)
        started: list[Server] = []
        try:
            for server in self._servers:
                if server.state is ServerState.NEW:
                    server.start()
                    started.append(server)
        except BaseException:
            for server in started:  # every server binds, or none
                for listener in server._listeners:
                    listener.close()
                server._listeners.clear()
                server.state = ServerState.NEW
            raise
        return kind

    def _run_own_loop(self, kind: EngineKind, install_signal_handlers: bool) -> None:
        """Run one of portside's own epoll loops on this thread."""
        reactor = kind.new_loop()
        previous: dict[signal.Signals, object] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            def on_signal(signum: int, frame: FrameType | None) -> None:
                reactor.call_soon_threadsafe(lambda: self._on_signal(signum))
            for signum in _SHUTDOWN_SIGNALS:  # SIGHUP is the application's (or a supervisor's)
                previous[signum] = signal.signal(signum, on_signal)
        try:
            self._open(reactor)
            reactor.run()
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)  # type: ignore[arg-type]
            self._close()  # before the loop closes: services unregister from it
            reactor.close()

    async def _serve(self, install_signal_handlers: bool) -> None:
        loop = asyncio.get_running_loop()
        reactor = self._kind.asyncio_reactor(loop)
        handled: list[signal.Signals] = []
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for signum in _SHUTDOWN_SIGNALS:
                loop.add_signal_handler(signum, self._on_signal, signum)
                handled.append(signum)
        try:
            self._open(reactor)
            await reactor.stopped.wait()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            self._close()

    def _open(self, reactor: Reactor) -> None:
        pools = self._kind.pools(self.config)
        with self._lock:
            self._reactor, self._pools = reactor, pools
            ready = [server for server in self._servers if server.state is ServerState.STARTED]
        for server in ready:
            self._begin(server)
        self.started.set()
        self._server_stopped()  # every server may have been shut down before the loop ran

    def _close(self) -> None:
        with self._lock:
            self._stopping = True
        for server in self._servers:
            server._release()
        self.stopped.set()

    # -- stopping --------------------------------------------------------------------------------

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Shut every server down gracefully (from any thread); the loop ends after the last."""
        for server in self._servers:
            server.shutdown(drain_timeout)

    def _server_stopped(self) -> None:
        """A server stopped (on the loop thread): end the loop once none is serving or about
        to (a server made but never started does not keep the loop running)."""
        with self._lock:
            if self._stopping or self._reactor is None:
                return
            if any(server.state in (ServerState.STARTED, ServerState.RUNNING,
                                    ServerState.DRAINING) for server in self._servers):
                return
            self._stopping = True
            reactor = self._reactor
        reactor.stop()

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self._signals_seen += 1
        forced = self._signals_seen > 1
        every = " every server" if len(self._servers) > 1 else ""
        logger.info("%s: %s", name, "forcing shutdown" if forced
                    else f"shutting down{every} gracefully (again to force)")
        for server in self._servers:
            if forced:
                server._force_close()
            else:
                server._shutdown(None)
