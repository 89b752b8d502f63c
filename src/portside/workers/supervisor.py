"""The supervisor: binds the listeners once, forks the workers, keeps them alive and answers
the control socket for all of them.

Theory of operation. Listening sockets are bound here and inherited by every worker, so they
never close while the server runs: a worker can be replaced (crash, stuck loop, SIGHUP) without
refusing or resetting a single connection, because the kernel's backlog belongs to the socket,
not to a process. (With SO_REUSEPORT each worker would own its backlog, and connections queued
to a worker that exits are reset; see README.) The supervisor runs portside's own epoll loop:
each worker is watched through a pidfd (readable when it exits) and linked by a socketpair that
speaks the control protocol; a ``stats`` request every ``heartbeat_interval`` doubles as the
heartbeat. Signal handlers only enqueue; the loop acts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from portside.config import ListenerConfig, ServerConfig
from portside.control import protocol
from portside.control.fleet import SupervisorTarget
from portside.control.paths import ControlSocket
from portside.control.server import ControlServer
from portside.engine.epoll import EpollReactor
from portside.engine.listener import bind_listener
from portside.engine.reactor import TimerHandle
from portside.errors import ProtocolError
from portside.handler import Handler
from portside.metrics import MetricsServer
from portside.workers.worker import run_worker

logger = logging.getLogger("portside.supervisor")

Reply = Callable[[Any], None]  # called with a command's result, or None when it failed


class WorkerLink:
    """The supervisor's end of a worker's socketpair: requests out, replies back in order."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = protocol.reply_decoder()
        self.waiting: deque[Reply] = deque()
        self.closed = False
        self.on_eof: Callable[[], None] | None = None

    def request(self, command: str, on_reply: Reply, args: dict[str, Any] | None = None) -> None:
        if self.closed:
            on_reply(None)
            return
        try:
            # A few dozen bytes: never blocks long.
            self.sock.sendall(protocol.request(command, args))
        except OSError:
            on_reply(None)
            return
        self.waiting.append(on_reply)

    def handle_read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            lines = self.decoder.feed(data) if data else None
        except ProtocolError:  # a reply over MAX_REPLY: the link is broken
            lines = None
        if lines is None:
            self.fail_all()
            if self.on_eof is not None:
                self.on_eof()  # stop watching it: level-triggered, EOF would wake us forever
            return
        for line in lines:
            if not self.waiting:
                continue
            on_reply = self.waiting.popleft()
            try:
                on_reply(protocol.parse_reply(line))
            except ProtocolError:
                on_reply(None)

    def handle_write(self) -> None:
        pass

    def fail_all(self) -> None:
        self.closed = True
        while self.waiting:
            self.waiting.popleft()(None)


@dataclass(eq=False)
class Worker:
    """One worker process as the supervisor tracks it."""

    pid: int
    pidfd: int
    link: WorkerLink
    started_at: float
    last_reply: float
    ready: bool = False
    retiring: bool = False
    #: Its place among the workers (0 .. workers-1), taken over by its replacement.
    slot: int = 0
    on_ready: list[Callable[[], None]] = field(default_factory=list)

    def handle_read(self) -> None:  # the pidfd: readable once the process has exited
        self.exited()

    def handle_write(self) -> None:
        pass

    exited: Callable[[], None] = lambda: None


class Supervisor:
    """Runs ``workers`` processes of one server and answers control commands for them all."""

    def __init__(self, handler_factory: Callable[[], Handler],
                 listeners: Sequence[ListenerConfig], config: ServerConfig, workers: int,
                 control: ControlSocket | None, heartbeat_interval: float = 1.0,
                 heartbeat_timeout: float = 10.0,
                 sockets: Sequence[socket.socket] | None = None) -> None:
        """``sockets``: listening sockets handed over (systemd socket activation), one per
        listener, served instead of binding."""
        self.handler_factory = handler_factory
        self.listener_configs = tuple(listeners)
        self.config = config
        self.worker_count = workers
        self.control_socket = control
        self.fleet = SupervisorTarget(self)
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.sockets: list[socket.socket] = list(sockets or [])
        self.metrics: MetricsServer | None = None
        self._bind = sockets is None
        self.control_server: ControlServer | None = None
        self.workers: dict[int, Worker] = {}
        self.reactor = EpollReactor()
        self.started_at = time.monotonic()
        self.shutting_down = False
        self.paused = False
        self.restarts = 0
        self._restarting = False
        self._quick_failures = 0
        self._signals: dict[int, int] = {}
        self._deadline: TimerHandle | None = None

    # -- start-up --------------------------------------------------------------------------------

    def serve_metrics(self, address: str) -> None:
        """Serve Prometheus metrics, summed over every worker, on ``HOST:PORT``."""
        self.metrics = MetricsServer(address, self)

    def start(self) -> None:
        """Bind every listener and the control socket; errors surface before any fork."""
        try:
            for listener_config in self.listener_configs if self._bind else ():
                self.sockets.append(bind_listener(listener_config))
            if self.control_socket is not None:
                self.control_server = ControlServer(self.control_socket, self.fleet)
        except BaseException:
            self._close_sockets()
            raise

    def run(self) -> int:
        """Serve until shutdown; returns the exit status (0 after a graceful shutdown)."""
        if self._bind and not self.sockets:
            self.start()
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, self._on_signal)
        try:
            if self.control_server is not None:
                self.control_server.attach(self.reactor)
            if self.metrics is not None:
                self.metrics.attach(self.reactor)
            for listener_config, sock in zip(self.listener_configs, self.sockets, strict=True):
                logger.info("listening on %s (%s)", _address(sock, listener_config),
                            listener_config.policy.value)
            for slot in range(self.worker_count):
                self._spawn(slot)
            self.reactor.call_later(self.heartbeat_interval, self._heartbeat)
            self.reactor.run()
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)
            self._kill_all(signal.SIGKILL)
            self._close_sockets()
            self.reactor.close()
        return 0

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        for listener_config in self.listener_configs if self._bind else ():
            if listener_config.path is not None:  # ours to remove only if we made it
                with contextlib.suppress(OSError):
                    os.unlink(listener_config.path)
        if self.control_server is not None:
            self.control_server.close()
            self.control_server = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> Worker:
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                parent_end.close()
                self._forget_in_child()
                status = run_worker(self.handler_factory, self.listener_configs, self.config,
                                    self.sockets, child_end)
            finally:
                logging.shutdown()
                os._exit(status)
        child_end.close()
        now = time.monotonic()
        link = WorkerLink(parent_end)
        worker = Worker(pid, os.pidfd_open(pid), link, now, now, slot=slot)
        worker.exited = lambda: self._reap(worker)
        link.on_eof = lambda: self.reactor.unregister(link.fd)
        self.workers[pid] = worker
        self.reactor.register(worker.pidfd, worker, readable=True, writable=False)
        self.reactor.register(link.fd, link, readable=True, writable=False)
        logger.info("started worker %d in slot %d", pid, slot)
        self.ask(worker, "stats", lambda result: self._first_reply(worker, result))
        return worker

    def _forget_in_child(self) -> None:
        """In a fresh worker: drop the supervisor's descriptors and signal handlers."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        for worker in self.workers.values():
            worker.link.sock.close()
            os.close(worker.pidfd)
        for service in (self.control_server, self.metrics):
            if service is not None:
                service.close_in_child()
        self.reactor.close()

    def _first_reply(self, worker: Worker, result: Any) -> None:
        if result is None:
            return
        worker.ready = True
        self.fleet.replay(worker)
        callbacks, worker.on_ready = worker.on_ready, []
        for callback in callbacks:
            callback()

    def ask(self, worker: Worker, command: str, on_reply: Reply,
            args: dict[str, Any] | None = None) -> None:
        def record(result: Any) -> None:
            if result is not None:
                worker.last_reply = time.monotonic()
            on_reply(result)
        worker.link.request(command, record, args)

    def _reap(self, worker: Worker) -> None:
        self.reactor.unregister(worker.pidfd)
        self.reactor.unregister(worker.link.fd)
        os.close(worker.pidfd)
        worker.link.sock.close()
        worker.link.fail_all()
        self.workers.pop(worker.pid, None)
        try:
            _, status = os.waitpid(worker.pid, 0)
        except ChildProcessError:
            status = 0
        lived = time.monotonic() - worker.started_at
        why = _describe_status(status)
        if self.shutting_down or worker.retiring:
            logger.info("worker %d stopped (%s)", worker.pid, why)
        else:
            logger.warning("worker %d died after %.1f s (%s)", worker.pid, lived, why)
            self._quick_failures = self._quick_failures + 1 if lived < 5.0 else 0
            # Exponential back-off so a handler that crashes at once does not fork in a loop.
            delay = min(10.0, 0.1 * 2 ** (self._quick_failures - 1)) if self._quick_failures else 0
            self.restarts += 1
            self.reactor.call_later(delay, self._replace_lost)
        if self.shutting_down and not self.workers:
            logger.info("all workers stopped")
            self.reactor.stop()

    def _replace_lost(self) -> None:
        taken = {worker.slot for worker in self.workers.values() if not worker.retiring}
        free = [slot for slot in range(self.worker_count) if slot not in taken]
        if not self.shutting_down and free:
            self._spawn(free[0])

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            silent = now - worker.last_reply
            if silent > self.heartbeat_timeout and not worker.retiring:
                logger.warning("worker %d has not answered for %.1f s; replacing it",
                               worker.pid, silent)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            elif not worker.link.waiting:  # one heartbeat in flight at a time
                self.ask(worker, "stats", lambda result: None)
        if not self.shutting_down:
            self.reactor.call_later(self.heartbeat_interval, self._heartbeat)

    # -- signals and commands --------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.call_soon_threadsafe(lambda: self._handle_signal(signum))

    def _handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if self._restarting:
                logger.info("SIGHUP: a restart is already under way; ignored")
                return
            logger.info("SIGHUP: replacing workers one by one")
            self.restart_workers()
            return
        self._signals[signum] = self._signals.get(signum, 0) + 1
        if not self.shutting_down:
            logger.info("%s: shutting down gracefully (again to force)", name)
            self.shutdown()
        else:
            logger.info("%s: forcing shutdown", name)
            self._kill_all(signal.SIGTERM)  # a worker's second SIGTERM forces its shutdown

    def shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        # Retiring workers were told already: a second SIGTERM would force them.
        self._kill_all(signal.SIGTERM, skip_retiring=True)
        if not self.workers:
            self.reactor.stop()
            return
        grace = self.config.drain_timeout + self.config.linger_timeout + 5.0
        self._deadline = self.reactor.call_later(grace, lambda: self._kill_all(signal.SIGKILL))

    def restart_workers(self) -> None:
        """Graceful restart: start a new worker, and once it answers retire one old one."""
        old = [worker for worker in self.workers.values() if not worker.retiring]
        self._restarting = True

        def replace(remaining: list[Worker]) -> None:
            if not remaining or self.shutting_down:
                self._restarting = False
                return
            retiree = remaining[0]
            fresh = self._spawn(retiree.slot)

            def retire() -> None:
                # The retiree may have died meanwhile (its pid could even be reused), or a
                # shutdown may have told it already: a second SIGTERM would force it.
                if not self.shutting_down and not retiree.retiring \
                        and self.workers.get(retiree.pid) is retiree:
                    retiree.retiring = True
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(retiree.pid, signal.SIGTERM)
                replace(remaining[1:])

            fresh.on_ready.append(retire)

        replace(old)

    def _kill_all(self, signum: int, skip_retiring: bool = False) -> None:
        for worker in self.workers.values():
            if skip_retiring and worker.retiring:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def control(self, request: protocol.Request, respond: Callable[[bytes], None]) -> None:
        """A control-socket command, carried out across every worker (``control.fleet``)."""
        self.fleet.control(request, respond)

    def fan_out(self, command: str, done: Callable[[list[Any]], None],
                args: dict[str, Any] | None = None) -> None:
        """Send ``command`` to every worker; ``done`` gets the replies that came back."""
        workers = list(self.workers.values())
        if not workers:
            done([])
            return
        replies: dict[int, Any] = {}

        def collect(worker: Worker) -> Reply:
            def on_reply(result: Any) -> None:
                replies[worker.pid] = result
                if len(replies) == len(workers):
                    done([reply for reply in replies.values() if reply is not None])
            return on_reply

        for worker in workers:
            self.ask(worker, command, collect(worker), args)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _address(sock: socket.socket, config: ListenerConfig) -> str:
    if config.path is not None:
        return f"unix:{config.path}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
