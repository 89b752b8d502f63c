"""The supervisor: binds the listeners once, starts the workers, keeps them alive, reloads and
upgrades without dropping a connection, and answers the control socket for all of them.

Theory of operation. Listening sockets are bound here and inherited by every worker, so they
never close while the server runs: a worker can be replaced (crash, stuck loop, reload) without
refusing or resetting a single connection, because the kernel's backlog belongs to the socket,
not to a process. (With SO_REUSEPORT each worker would own its backlog, and connections queued
to a worker that exits are reset: docs/operations.md.) The supervisor runs portside's own
epoll loop: each worker is watched through a pidfd (readable when it exits) and linked by a
socketpair that speaks the control protocol; a ``stats`` request every
``heartbeat_interval`` doubles as the heartbeat, and a worker's first reply means it booted.
Signal handlers only enqueue; the loop acts.

Workers are fresh interpreters (``python -m portside.workers.worker``), so SIGHUP, which
re-reads the settings and replaces the workers one by one, also loads the handler's new code.
USR2 upgrades portside itself: a new supervisor is started from the current installation with
the listening sockets (``PORTSIDE_LISTEN_FDS``) and a pipe; once its workers serve it writes to
the pipe, and the old supervisor drains and exits. A worker that exits before it ever answered
failed to boot: three in a row with no worker serving stop the supervisor (status 3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from portside.config import ListenerConfig, ProcessConfig, ServerConfig, address_label
from portside.control import protocol
from portside.control.fleet import SupervisorTarget
from portside.control.paths import INHERIT_ENV as CONTROL_FD_ENV
from portside.control.paths import ControlSocket
from portside.control.server import ControlServer
from portside.engine.activation import INHERIT_ENV
from portside.engine.epoll import EpollReactor
from portside.engine.listener import bind_listener
from portside.engine.reactor import TimerHandle
from portside.errors import PortsideError, ProtocolError
from portside.metrics import INHERIT_ENV as METRICS_FD_ENV
from portside.metrics import MetricsServer, adopt_metrics
from portside.server import resolve_engine
from portside.statistics import Retired
from portside.workers import logs, systemd
from portside.workers.app import describe_handlers
from portside.workers.worker import BOOT_FAILED, WORKER_ENV, worker_document

logger = logging.getLogger("portside.supervisor")

Reply = Callable[[Any], None]  # called with a command's result, or None when it failed
MAX_BOOT_FAILURES = 3  # in a row, with no worker serving: stop rather than respawn forever
BOOT_TIMEOUT = 60.0  # seconds a new worker may take to answer its first request
UPGRADE_FD_ENV = "PORTSIDE_UPGRADE_FD"


@dataclass
class Plan:
    """What the supervisor runs; made anew from the settings' sources on every reload."""

    handler: str | None  # MODULE:CLASS, imported by each worker (None: each listener names one)
    app_dir: str | None
    listeners: list[ListenerConfig]
    server: ServerConfig
    process: ProcessConfig

    @property
    def worker_count(self) -> int:
        return self.process.workers or 1


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

    number: int  # its slot, 1..N: a replacement takes the slot of the worker it replaces
    process: subprocess.Popen[bytes]
    pidfd: int
    link: WorkerLink
    started_at: float
    last_reply: float
    ready: bool = False
    retiring: bool = False
    fresh: bool = False  # started by a reload: its failure to boot aborts the reload
    on_ready: list[Callable[[], None]] = field(default_factory=list)
    last_stats: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def slot(self) -> str:
        """Its number as ``ctl``, ``top`` and the metrics' ``worker`` label show it (the
        number its log lines carry too): a replacement keeps it, so series survive restarts."""
        return str(self.number)

    @property
    def name(self) -> str:
        """How every supervisor line names it."""
        return f"worker {self.number} (pid {self.pid})"

    def handle_read(self) -> None:  # the pidfd: readable once the process has exited
        self.exited()

    def handle_write(self) -> None:
        pass

    exited: Callable[[], None] = lambda: None


class _Readable:
    """A descriptor watched by the loop, calling ``on_read`` when it is readable."""

    def __init__(self, on_read: Callable[[], None]) -> None:
        self.handle_read = on_read

    def handle_write(self) -> None:
        pass


class Supervisor:
    """Runs the workers of one server and answers control commands for them all."""

    def __init__(self, plan: Plan, replan: Callable[[], Plan] | None = None,
                 control: ControlSocket | None = None, heartbeat_interval: float = 1.0,
                 sockets: list[socket.socket] | None = None,
                 upgrade_fd: int | None = None) -> None:
        """``replan`` re-reads the settings (SIGHUP); ``sockets``: listening sockets handed
        over (socket activation, fd://N, an upgrade), one per listener, served instead of
        binding; ``upgrade_fd``: the pipe to tell the supervisor being upgraded that we serve."""
        self.plan = plan
        self.replan = replan
        self.control_socket = control
        self.fleet = SupervisorTarget(self)
        self.heartbeat_interval = heartbeat_interval
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
        self.reloads = 0
        self.exit_status = 0
        self._restarting = False
        self._serving = False  # every first worker answered: READY=1 was sent
        self._quick_failures = 0
        self._boot_failures = 0
        self._signals: dict[int, int] = {}
        self._deadline: TimerHandle | None = None
        self._upgrade_fd = upgrade_fd
        self._successor: subprocess.Popen[bytes] | None = None
        self._handed_over = False  # an upgraded supervisor serves our sockets now
        #: What ended workers counted: every counter keeps it, so none goes backwards.
        self.retired = Retired()

    @property
    def worker_count(self) -> int:
        return self.plan.worker_count

    # -- start-up --------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener, the control socket and metrics; errors surface before any
        worker starts."""
        try:
            for listener_config in self.plan.listeners if self._bind else ():
                self.sockets.append(bind_listener(listener_config))
            self._open_side_services()
        except BaseException:
            self._close_sockets()
            raise

    def _open_side_services(self) -> None:
        if self.control_socket is not None:
            self.control_server = ControlServer(self.control_socket, self.fleet)
        if self.plan.process.metrics:
            self.metrics = MetricsServer(self.plan.process.metrics, self,
                                         sock=adopt_metrics(self.plan.process.metrics))

    def run(self) -> int:
        """Serve until shutdown; returns the exit status (0 after a graceful shutdown)."""
        if self._bind and not self.sockets:
            self.start()
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2):
            previous[signum] = signal.signal(signum, self._on_signal)
        logs.set_role("supervisor")
        try:
            if self._upgrade_fd is None:  # else once our workers serve (``_take_over``)
                self._attach_side_services()
            for listener_config, sock in zip(self.plan.listeners, self.sockets, strict=True):
                logger.info("listening on %s (%s)", _address(sock, listener_config),
                            listener_config.policy.value)
            for number in range(1, self.worker_count + 1):
                self._spawn(number)
            self.reactor.call_later(self.heartbeat_interval, self._heartbeat)
            interval = systemd.watchdog_interval()
            if interval is not None:
                self._watchdog(interval)
            self.reactor.run()
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old)
            self._kill_all(signal.SIGKILL)
            for worker in list(self.workers.values()):
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    worker.process.wait(1.0)
            self._close_sockets()
            self.reactor.close()
        logger.info("stopped after %.1f s: %d connection(s) accepted, %d bytes in, %d bytes "
                    "out (as last reported by the workers), %d worker restart(s), %d reload(s)",
                    time.monotonic() - self.started_at, self.retired.total("accepted"),
                    self.retired.total("bytes_in"), self.retired.total("bytes_out"),
                    self.restarts, self.reloads)
        return self.exit_status

    def _attach_side_services(self) -> None:
        if self.control_server is not None:
            self.control_server.attach(self.reactor)
        if self.metrics is not None:
            self.metrics.attach(self.reactor)

    def _close_side_services(self) -> None:
        if self.control_server is not None:
            self.control_server.close()
            self.control_server = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _close_sockets(self) -> None:
        self._close_listeners()
        self._close_side_services()

    def _close_listeners(self) -> None:
        """Close our copies of the listening sockets. The kernel refuses new connections once
        the last copy is closed, so a shutdown closes them at once here, and each worker its
        own as it starts draining (as a single server does), rather than leaving connections
        to wait in a backlog nobody will ever accept from."""
        for sock in self.sockets:
            sock.close()
        for listener_config in self.plan.listeners if self._bind else ():
            # Ours to remove only if we made it, and nobody serves it after an upgrade.
            if listener_config.path is not None and not self._handed_over:
                with contextlib.suppress(OSError):
                    os.unlink(listener_config.path)

    def _watchdog(self, interval: float) -> None:
        systemd.notify("WATCHDOG=1")
        self.reactor.call_later(interval, lambda: self._watchdog(interval))

    # -- workers ---------------------------------------------------------------------------------

    def _spawn(self, number: int, fresh: bool = False) -> Worker:
        """Start a worker process: a new interpreter that imports the handler afresh."""
        parent_end, child_end = socket.socketpair()
        fds = [sock.fileno() for sock in self.sockets]
        plan = self.plan
        env = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env[WORKER_ENV] = worker_document(plan.handler, plan.app_dir, number, plan.listeners,
                                          plan.server, plan.process, fds, child_end.fileno())
        # The worker imports portside from where this supervisor did.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root,
                                                          env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "portside.workers.worker"], env=env,
                pass_fds=(*fds, child_end.fileno()), stdin=subprocess.DEVNULL,
                process_group=0)  # Ctrl-C reaches the supervisor alone; it tells the workers
        finally:
            child_end.close()
        now = time.monotonic()
        link = WorkerLink(parent_end)
        worker = Worker(number, process, os.pidfd_open(process.pid), link, now, now,
                        fresh=fresh)
        worker.exited = lambda: self._reap(worker)
        link.on_eof = lambda: self.reactor.unregister(link.fd)
        self.workers[process.pid] = worker
        self.reactor.register(worker.pidfd, worker, readable=True, writable=False)
        self.reactor.register(link.fd, link, readable=True, writable=False)
        logger.info("started %s", worker.name)
        self.ask(worker, "stats", lambda result: self._first_reply(worker, result))
        return worker

    def _first_reply(self, worker: Worker, result: Any) -> None:
        if result is None:
            return
        worker.ready = True
        worker.last_stats = result
        self._boot_failures = 0
        logger.info("%s is serving", worker.name)
        self.fleet.replay(worker)  # what operators changed on the workers before this one
        callbacks, worker.on_ready = worker.on_ready, []
        for callback in callbacks:
            callback()
        if not self._serving and sum(w.ready for w in self.workers.values()) >= \
                self.worker_count:
            self._serving = True
            self._now_serving()

    def _now_serving(self) -> None:
        """Every first worker serves: tell systemd, and the supervisor we upgrade, if any."""
        plan = self.plan
        # As the workers report it: only they import the handlers, which may choose the engine
        # (``auto`` runs coroutine handlers on uvloop).
        engines = sorted({str(worker.last_stats.get("engine")) for worker in self.workers.values()
                          if worker.last_stats is not None})
        logger.info("serving %s with %d worker(s): engine %s, TLS %s, PROXY protocol %s, "
                    "at most %d connections per listener per worker, drain %g s",
                    describe_handlers(plan.handler, plan.listeners), self.worker_count,
                    ",".join(engines) or resolve_engine(plan.server.engine).value,
                    "on" if plan.process.certfile else "off",
                    ",".join(sorted({lc.proxy_protocol.value for lc in plan.listeners})),
                    min(lc.max_connections for lc in plan.listeners),
                    plan.server.drain_timeout)
        systemd.notify("READY=1", f"MAINPID={os.getpid()}")
        if self._upgrade_fd is not None:
            self._take_over()

    def _take_over(self) -> None:
        """We were started by USR2 and serve: tell the supervisor being upgraded, then answer
        on the control socket and metrics port it handed us (until now it answered). If it
        gave up on us meanwhile (``upgrade_timeout``), it is still in charge: we stop."""
        assert self._upgrade_fd is not None
        try:
            os.write(self._upgrade_fd, b"serving\n")
            told = True
        except OSError:
            told = False
        os.close(self._upgrade_fd)
        self._upgrade_fd = None
        if not told:
            logger.error("upgrade: the supervisor that started us gave up on us; stopping")
            self.shutdown()
            return
        if self.control_socket is not None:
            self.control_socket.claim()
        self._attach_side_services()

    def ask(self, worker: Worker, command: str, on_reply: Reply,
            args: dict[str, Any] | None = None) -> None:
        def record(result: Any) -> None:
            if result is not None:
                worker.last_reply = time.monotonic()
                if command == "stats":
                    worker.last_stats = result
            on_reply(result)
        worker.link.request(command, record, args)

    def _reap(self, worker: Worker) -> None:
        self.reactor.unregister(worker.pidfd)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.reactor.unregister(worker.link.fd)
        os.close(worker.pidfd)
        worker.link.sock.close()
        worker.link.fail_all()
        self.workers.pop(worker.pid, None)
        status = worker.process.wait()
        self.retired.add(worker.last_stats)
        lived = time.monotonic() - worker.started_at
        why = _describe_status(status)
        name = worker.name
        if self.shutting_down or worker.retiring:
            logger.info("%s stopped (%s)", name, why)
        elif not worker.ready:
            self._boot_failed(worker, name, why)
        else:
            logger.warning("%s died after %.1f s (%s)", name, lived, why)
            self._schedule_replacement(lived)
        if self.shutting_down and not self.workers:
            logger.info("all workers stopped")
            self.reactor.stop()

    def _boot_failed(self, worker: Worker, name: str, why: str) -> None:
        self._boot_failures += 1
        if worker.fresh and self._restarting:
            logger.error("reload failed: %s failed to boot (%s); the old workers keep "
                         "serving", name, why)
            self._restarting = False
            systemd.notify("READY=1")
            return
        serving = any(w.ready for w in self.workers.values())
        if self._boot_failures >= MAX_BOOT_FAILURES and not serving:
            logger.error("worker failed to boot %d times in a row (last: %s); stopping",
                         self._boot_failures, why)
            self.exit_status = BOOT_FAILED
            self.shutdown()
            return
        logger.warning("%s failed to boot (%s)", name, why)
        self._schedule_replacement(0.0)

    def _schedule_replacement(self, lived: float) -> None:
        self._quick_failures = self._quick_failures + 1 if lived < 5.0 else 0
        # Exponential back-off so a handler that crashes at once does not fork in a loop.
        delay = min(10.0, 0.1 * 2 ** (self._quick_failures - 1)) if self._quick_failures else 0
        self.restarts += 1
        self.reactor.call_later(delay, self._replace_lost)

    def _replace_lost(self) -> None:
        live = [worker for worker in self.workers.values() if not worker.retiring]
        taken = {worker.number for worker in live}
        for number in range(1, self.worker_count + 1):
            if self.shutting_down or len(live) >= self.worker_count:
                return
            if number not in taken:
                live.append(self._spawn(number))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            silent = now - worker.last_reply
            # A booting worker (a new interpreter importing the handler) gets longer.
            timeout = self.plan.process.heartbeat_timeout if worker.ready else \
                max(self.plan.process.heartbeat_timeout, BOOT_TIMEOUT)
            if silent > timeout and not worker.retiring:
                logger.warning("%s has not answered for %.1f s; replacing it",
                               worker.name, silent)
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
            self.reload()
            return
        if signum == signal.SIGUSR2:
            self.upgrade()
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
        if not self._handed_over:  # after an upgrade the service goes on, in our successor
            systemd.notify("STOPPING=1")
        self._close_listeners()
        # Retiring workers were told already: a second SIGTERM would force them.
        self._kill_all(signal.SIGTERM, skip_retiring=True)
        if not self.workers:
            self.reactor.stop()
            return
        grace = self.plan.server.drain_timeout + self.plan.server.linger_timeout + 5.0
        self._deadline = self.reactor.call_later(grace, lambda: self._kill_all(signal.SIGKILL))

    def reload(self) -> None:
        """SIGHUP: re-read the settings, then replace every worker by a fresh one (new code)."""
        if self._restarting or self.shutting_down:
            logger.info("SIGHUP: a reload is already under way; ignored")
            return
        logger.info("SIGHUP: reloading: re-reading the settings and starting workers with "
                    "the code now on disk")
        systemd.reloading()
        self.reloads += 1
        if self.replan is not None:
            try:
                plan = self.replan()
            except PortsideError as exc:
                logger.error("reload: %s; keeping the current settings", exc)
            else:
                self._adopt(plan)
        self.restart_workers()

    def _adopt(self, plan: Plan) -> None:
        old = [listener.address for listener in self.plan.listeners]
        new = [listener.address for listener in plan.listeners]
        if new != old:
            logger.warning("reload: the listeners changed (%s -> %s); keeping the sockets "
                           "already open (upgrade with USR2 or restart to change them)",
                           ", ".join(old), ", ".join(new))
            plan.listeners = list(self.plan.listeners)  # the open sockets' settings
        for name in ("metrics", "control"):
            if getattr(plan.process, name) != getattr(self.plan.process, name):
                logger.warning("reload: --%s cannot change in a reload; restart or upgrade "
                               "(USR2) to change it", name)
        logs.configure(plan.process.log_level, plan.process.log_format)
        self.plan = plan

    def restart_workers(self) -> None:
        """Graceful restart: start a new worker, and once it answers retire one old one."""
        old = sorted((worker for worker in self.workers.values() if not worker.retiring),
                     key=lambda worker: worker.number)
        self._restarting = True

        def retire(retiree: Worker) -> None:
            # The retiree may have died meanwhile (its pid could even be reused), or a
            # shutdown may have told it already: a second SIGTERM would force it.
            if not self.shutting_down and not retiree.retiring \
                    and self.workers.get(retiree.pid) is retiree:
                retiree.retiring = True
                logger.info("reload: retiring %s once its connections finish",
                            retiree.name)
                # Over the link, not SIGTERM: the worker drains without calling it a shutdown.
                self.ask(retiree, "shutdown", lambda result: None)

        def replace(number: int) -> None:
            if not self._restarting or self.shutting_down:
                return
            if number > self.worker_count:
                for retiree in old[number - 1:]:  # fewer workers than before
                    retire(retiree)
                self._restarting = False
                logger.info("reload complete: %d worker(s) serving", self.worker_count)
                systemd.notify("READY=1")
                return
            fresh = self._spawn(number, fresh=True)

            def ready() -> None:
                if number <= len(old):
                    retire(old[number - 1])
                replace(number + 1)

            fresh.on_ready.append(ready)

        replace(1)

    def upgrade(self) -> None:
        """USR2: start a new supervisor from the current installation on our sockets; once it
        serves, hand it the control socket and metrics port, drain and exit. One that is not
        serving within ``upgrade_timeout`` is stopped, and we serve on."""
        if self._successor is not None or self.shutting_down:
            logger.info("USR2: an upgrade is already under way; ignored")
            return
        logger.info("USR2: upgrading: starting a new supervisor on the same sockets")
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        fds = [sock.fileno() for sock in self.sockets]
        env = {key: value for key, value in os.environ.items() if key != "WATCHDOG_PID"}
        env[INHERIT_ENV] = ",".join(f"{fd}:{listener.name or ''}" for fd, listener in
                                    zip(fds, self.plan.listeners, strict=True))
        env[UPGRADE_FD_ENV] = str(write_end)
        # The control socket and metrics port are handed over, not closed: we go on answering
        # on them until the new supervisor serves (then it answers, and we let go).
        side = self._side_fds()
        env.update({name: str(fd) for name, fd in side.items()})
        try:
            for fd in fds:
                os.set_inheritable(fd, True)
            successor = subprocess.Popen(
                [sys.executable, *sys.orig_argv[1:]], env=env,
                pass_fds=(*fds, *side.values(), write_end), stdin=subprocess.DEVNULL)
        except OSError as exc:
            os.close(read_end)
            logger.error("upgrade failed: cannot start a new supervisor: %s", exc)
            return
        finally:
            os.close(write_end)
        self._successor = successor
        timeout = self.plan.process.upgrade_timeout
        logger.info("upgrade: new supervisor pid %d is starting (given up unless it serves "
                    "within %g s)", successor.pid, timeout)

        def stop_watching() -> None:
            self.reactor.unregister(read_end)
            os.close(read_end)  # a successor that reports later hears it is too late (EPIPE)
            deadline.cancel()

        def on_pipe() -> None:
            try:
                data = os.read(read_end, 64)
            except OSError:
                data = b""
            stop_watching()
            if data.startswith(b"serving"):
                logger.info("upgrade: new supervisor pid %d is serving; draining and "
                            "exiting", successor.pid)
                self._handed_over = True
                self._release_side_services()
                self.shutdown()
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                successor.wait(0.5)
            logger.error("upgrade failed: the new supervisor pid %d quit before serving "
                         "(%s); still serving", successor.pid,
                         _describe_status(successor.returncode or 0))
            self._successor = None

        def give_up() -> None:
            stop_watching()
            logger.error("upgrade failed: the new supervisor pid %d is not serving after %g s "
                         "(upgrade_timeout); stopping it; still serving", successor.pid,
                         timeout)
            self._successor = None  # a corrected USR2 may follow at once
            self._stop_successor(successor)

        deadline = self.reactor.call_later(timeout, give_up)
        self.reactor.register(read_end, _Readable(on_pipe), readable=True, writable=False)

    def _stop_successor(self, successor: subprocess.Popen[bytes]) -> None:
        """SIGTERM a successor given up (it stops its workers, hung imports included), SIGKILL
        it if it has not gone within the drain period; reaped through a pidfd."""
        pidfd = os.pidfd_open(successor.pid)
        with contextlib.suppress(ProcessLookupError):
            successor.send_signal(signal.SIGTERM)

        def kill() -> None:
            if successor.poll() is None:
                logger.warning("upgrade: new supervisor pid %d ignored SIGTERM; killing it",
                               successor.pid)
                with contextlib.suppress(ProcessLookupError):
                    successor.kill()

        timer = self.reactor.call_later(self.plan.server.drain_timeout + 5.0, kill)

        def reaped() -> None:
            self.reactor.unregister(pidfd)
            os.close(pidfd)
            timer.cancel()
            status = successor.wait()
            logger.info("upgrade: new supervisor pid %d stopped (%s)", successor.pid,
                        _describe_status(status))

        self.reactor.register(pidfd, _Readable(reaped), readable=True, writable=False)

    def _side_fds(self) -> dict[str, int]:
        """The control socket's and metrics port's descriptors, by the variable naming them
        to a successor."""
        found = {}
        if self.control_server is not None:
            fd = self.control_server.control.inheritable_fd()
            if fd is not None:
                found[CONTROL_FD_ENV] = fd
        if self.metrics is not None:
            os.set_inheritable(self.metrics.sock.fileno(), True)
            found[METRICS_FD_ENV] = self.metrics.sock.fileno()
        return found

    def _release_side_services(self) -> None:
        """The successor answers on the control socket and metrics port now: stop accepting
        on them and close our copies, removing no file. Clients already connected are still
        answered (a request in flight is not cut); they go when we exit."""
        for service in (self.control_server, self.metrics):
            if service is not None:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self.reactor.unregister(service.sock.fileno())
        if self.control_server is not None:
            self.control_server.control.release()
        if self.metrics is not None:
            self.metrics.sock.close()

    def _kill_all(self, signum: int, skip_retiring: bool = False) -> None:
        for worker in self.workers.values():
            if skip_retiring and worker.retiring:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def control(self, request: protocol.Request, respond: Callable[[bytes], None]) -> None:
        """A control-socket command, carried out across every worker (``control.fleet``)."""
        self.fleet.control(request, respond)

    def readiness(self) -> str | None:
        """None while new connections are welcome (``/readyz``): every first worker served,
        and no shutdown, drain or pause since; else why not."""
        if self.shutting_down:
            return "draining"
        if not self._serving:
            return "starting"
        if not any(worker.ready and not worker.retiring for worker in self.workers.values()):
            return "no worker serving"
        if self.fleet.draining:
            return "draining"
        return "paused" if self.paused else None

    @property
    def listener_configs(self) -> tuple[ListenerConfig, ...]:
        return tuple(self.plan.listeners)

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
    """A Popen return code (negative: killed by that signal) in words."""
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _address(sock: socket.socket, config: ListenerConfig) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    return address_label(sock.getsockname())
