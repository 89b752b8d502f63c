"""Inherited listening socket vs SO_REUSEPORT per worker: connection spread and rate.

Runs portside echo workers two ways on loopback: (a) one socket bound by the parent and
inherited by every worker (what the supervisor does), (b) a socket per worker bound with
SO_REUSEPORT. A client opens short-lived connections (connect, send 64 B, read the echo, close)
from a few threads, for a bounded count, and each worker reports how many it served.

    python -m bench.spread [--workers 2] [--connections 20000] [--threads 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from portside import Connection, ListenerConfig, Server, ServerConfig
from portside.engine.listener import bind_listener
from portside.examples.echo import EchoHandler

MESSAGE = b"x" * 64


class CountingEcho(EchoHandler):
    """Echo that writes how many connections it served to a pipe when it stops."""

    def __init__(self, report_fd: int) -> None:
        self.report_fd = report_fd
        self.served = 0

    def connection_made(self, conn: Connection, first_data: memoryview | None) -> None:
        self.served += 1
        super().connection_made(conn, first_data)

    def server_stopped(self, server: Server) -> None:
        os.write(self.report_fd, f"{os.getpid()} {self.served}\n".encode())


def reuse_port_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


def start_workers(count: int, socket_for_worker: Callable[[], socket.socket],
                  report_fd: int) -> list[int]:
    config = ListenerConfig(host="127.0.0.1")
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                server = Server(CountingEcho(report_fd), [config], ServerConfig(),
                                sockets=[socket_for_worker()])
                server.run()
            finally:
                os._exit(0)
        pids.append(pid)
    return pids


def drive(port: int, connections: int, threads: int) -> float:
    """Short-lived connections from ``threads`` threads; returns connections per second."""
    per_thread = connections // threads

    def client() -> None:
        for _ in range(per_thread):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(MESSAGE)
                got = b""
                while len(got) < len(MESSAGE):
                    got += sock.recv(64)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return per_thread * threads / (time.perf_counter() - started)


def measure(mode: str, workers: int, connections: int, threads: int) -> str:
    read_fd, write_fd = os.pipe()
    if mode == "inherited":
        shared = bind_listener(ListenerConfig(host="127.0.0.1", port=0))
        port = shared.getsockname()[1]
        pids = start_workers(workers, lambda: shared, write_fd)
        shared.close()
    else:
        holder = socket.socket()  # reserves the port for the group without accepting itself
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        pids = start_workers(workers, lambda: reuse_port_socket(port), write_fd)
        # Wait until every worker listens: a connection refused means one is missing.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
        holder.close()
    drive(port, 500, threads)  # warm-up: each worker's pools and code paths
    rate = drive(port, connections, threads)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        served = sorted(int(line.split()[1]) for line in reports)
    share = ", ".join(f"{count / sum(served):.0%}" for count in served)
    return f"| {mode} | {rate:,.0f} | {share} | {max(served) / min(served or [1]):.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    print(f"{args.workers} workers, {args.connections} short-lived connections from "
          f"{args.threads} client threads, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print("| listening sockets | connections/s | share per worker | busiest/idlest |")
    print("|---|---:|---|---:|")
    for mode in ("inherited", "reuseport", "inherited", "reuseport"):
        print(measure(mode, args.workers, args.connections, args.threads), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
