"""Starts one echo server as a child process pinned to its CPU, and stops it again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench.build import build
from bench.pipes import read_line
from bench.procfs import child_setup
from bench.servers import ServerSpec

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class ServerStartError(RuntimeError):
    """The server exited or said nothing before it was listening."""


@dataclass(frozen=True)
class RunningServer:
    name: str
    pid: int
    port: int
    data_first_port: int
    #: A relay's: the server it forwards to, whose CPU is its own figure, not "other".
    upstream_pid: int | None = None


def command(spec: ServerSpec, max_seconds: float, extra: tuple[str, ...]) -> list[str]:
    """The argv that starts ``spec``: the compiled binary or ``python -m module``."""
    lifetime = ("--max-seconds", str(int(max_seconds) + 1))
    if spec.c_source is not None:
        return [str(build(spec.c_source)), "--port", "0", *lifetime]
    assert spec.module is not None
    return [sys.executable, "-m", spec.module, *spec.args, "--port", "0", *lifetime, *extra]


def _environment(tree: Path) -> dict[str, str]:
    """Children import ``bench`` from ``tree`` and ``portside`` from its src/ (the commit
    being measured), whatever is installed."""
    env = dict(os.environ)
    paths = [str(tree / "src"), str(tree)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@contextmanager
def running(spec: ServerSpec, *, cpu: int | None, nofile: int, max_seconds: float,
            log: IO[Any], extra: tuple[str, ...] = ()) -> Iterator[RunningServer]:
    """Run ``spec`` for the ``with`` block; it is stopped (SIGTERM, then SIGKILL) afterwards.

    The server's stderr goes to ``log``; it stops by itself after ``max_seconds`` anyway.
    """
    proc = subprocess.Popen(command(spec, max_seconds, extra), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=log, cwd=spec.tree or REPO,
                            env=_environment(spec.tree or REPO),
                            preexec_fn=child_setup(cpu, nofile))
    try:
        assert proc.stdout is not None
        try:
            line = read_line(proc.stdout.fileno(), START_TIMEOUT)
        except RuntimeError as exc:
            raise ServerStartError(f"{spec.name} did not start: {exc} "
                                   f"(exit status {proc.poll()}; see its log)") from None
        ports: dict[str, int] = json.loads(line)
        yield RunningServer(spec.name, proc.pid, int(ports["port"]),
                            int(ports.get("data_first_port", 0)))
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop our own child by its handle: SIGTERM, and SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()
