"""Runs the C load generator (bench/loadgen.c) and reads what it reports.

``run`` drives one measured (or warm-up) window and returns a ``LoadgenReport``; ``hold_idle``
keeps N silent connections open for as long as the ``with`` block lasts.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.build import build
from bench.pipes import read_line
from bench.procfs import child_setup

SOURCE = Path(__file__).resolve().parent / "loadgen.c"
LIBS = ("-lssl", "-lcrypto")  # OpenSSL, for the TLS scenarios (Debian: libssl-dev)
HOST = "127.0.0.1"


class LoadgenError(RuntimeError):
    """The load generator failed, printed nothing usable, or overran its time."""


@dataclass(frozen=True)
class LoadgenReport:
    mode: str
    conns: int
    size: int
    seconds: float
    completed: int
    errors: int
    verify_errors: int
    connect_errors: int
    p50_us: float
    p99_us: float
    max_bucket_us: float
    loadgen_cpu_s: float
    server_cpu_s: float  # -1 when the server's /proc entry could not be read
    host_busy_s: float  # -1 when /proc/stat could not be read
    closed_by_server: int
    reconnects: int
    unexpected_bytes: int
    tls: int  # 1: the connections spoke TLS
    handshakes: int  # TLS handshakes completed
    resumed: int  # ... of which resumed a session
    tls_errors: int  # TLS handshakes or records that failed

    @classmethod
    def parse(cls, text: str) -> LoadgenReport:
        lines = [line for line in text.splitlines() if line.startswith("{")]
        if not lines:
            raise LoadgenError(f"the load generator printed no report: {text[-500:]!r}")
        data: dict[str, Any] = json.loads(lines[-1])
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    @property
    def failures(self) -> int:
        """Requests that failed: errors, mismatched echoes, failed connects and handshakes."""
        return self.errors + self.verify_errors + self.connect_errors + self.tls_errors


@dataclass(frozen=True)
class Loadgen:
    """The compiled load generator and where it runs."""

    binary: Path
    cpu: int | None
    connect_timeout: float
    source_addresses: int

    @classmethod
    def build(cls, cpu: int | None, connect_timeout: float, source_addresses: int) -> Loadgen:
        return cls(build(SOURCE, libs=LIBS), cpu, connect_timeout, source_addresses)

    def _argv(self, mode: str, port: int, conns: int, size: int, seconds: float,
              server_pid: int | None, extra: tuple[str, ...] = ()) -> list[str]:
        argv = [str(self.binary), mode, "--host", HOST, "--port", str(port),
                "--conns", str(conns), "--size", str(size), "--seconds", f"{seconds:.3f}",
                "--connect-timeout", f"{self.connect_timeout:.1f}",
                "--src-base", "2", "--src-count", str(self.source_addresses)]
        if server_pid is not None:
            argv += ["--server-pid", str(server_pid)]
        return argv + list(extra)

    def run(self, mode: str, port: int, conns: int, size: int, seconds: float,
            server_pid: int | None = None, tls: bool = False,
            resume: bool = False) -> LoadgenReport:
        """One window of ``persistent`` or ``short`` load; returns the generator's report.

        ``tls``: every connection speaks TLS; ``resume``: new connections resume a session.
        """
        flags = ("--tls",) if tls else ()
        argv = self._argv(mode, port, conns, size, seconds, server_pid,
                          flags + (("--resume",) if resume else ()))
        limit = self.connect_timeout + seconds + 30
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=limit,
                                  preexec_fn=child_setup(self.cpu, conns + 256), check=False)
        except subprocess.TimeoutExpired:
            raise LoadgenError(f"loadgen {mode} overran {limit:.0f} s") from None
        if done.returncode != 0:
            raise LoadgenError(f"loadgen {mode} exited {done.returncode}: {done.stderr.strip()}")
        return LoadgenReport.parse(done.stdout)

    @contextmanager
    def hold_idle(self, port: int, conns: int, max_seconds: float, reconnect: bool = False,
                  server_pid: int | None = None) -> Iterator[IdleHold]:
        """Open ``conns`` silent connections and hold them for the ``with`` block.

        With ``reconnect`` a connection the server closes is opened again (slowloris). The
        generator holds for at most ``max_seconds`` even if the block lasts longer.
        """
        extra = ("--reconnect", "--max-reconnects", str(conns * 1000)) if reconnect else ()
        argv = self._argv("idle", port, conns, 1, max_seconds, server_pid, extra)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                preexec_fn=child_setup(self.cpu, conns + 256))
        hold = IdleHold(proc)
        try:
            assert proc.stdout is not None
            line = read_line(proc.stdout.fileno(), self.connect_timeout + 10)
            if not line.startswith("READY "):
                raise LoadgenError(f"idle loadgen did not get ready: {line!r}")
            ready: dict[str, Any] = json.loads(line[len("READY "):])
            hold.connected = int(ready["connected"])
            hold.connect_seconds = float(ready["connect_seconds"])
            yield hold
            hold.report = hold.finish(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()  # only this generator, by its own handle
                proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


class IdleHold:
    """A running idle generator: how many connections it opened, and its report once done."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.connected = 0
        self.connect_seconds = 0.0
        self.report: LoadgenReport | None = None

    def finish(self, timeout: float) -> LoadgenReport:
        """Close its standard input (it then closes every connection) and read its report."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LoadgenError("idle loadgen did not stop after its stdin closed") from None
        if self.proc.returncode != 0:
            raise LoadgenError(f"idle loadgen exited {self.proc.returncode}: {err.decode()}")
        return LoadgenReport.parse(out.decode())
