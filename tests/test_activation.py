"""systemd socket activation: portside serves the sockets passed in LISTEN_FDS."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from proc import PortsideProcess, echo_once

from portside.engine.activation import activated_sockets

WAIT = 20.0


def activated(args: list[str], sockets: list[socket.socket], names: str) -> PortsideProcess:
    """``portside ARGS`` started the way systemd starts a socket-activated service: the
    sockets as descriptors 3, 4, ..., and LISTEN_PID naming the service's own pid (the shell
    sets it, then execs Python in its place)."""
    fds = [sock.fileno() for sock in sockets]
    moves = " ".join(f"{3 + index}<&{fd} {fd}<&-" for index, fd in enumerate(fds))
    script = f'exec {moves}; LISTEN_PID=$$ exec "$@"'
    return PortsideProcess(args, env={"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names},
                           wrapper=["bash", "-c", script, "bash"], pass_fds=fds)


def listening(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(64)
    return sock




def test_echo_serves_the_handed_sockets(tmp_path: Path) -> None:
    immediate, data_first = listening(), listening()
    # Named the other way round from the echo command's listener order, on purpose.
    proc = activated(["echo", "--control", str(tmp_path / "ctl")], [immediate, data_first],
                     "immediate:data-first")
    try:
        proc.wait_for(r"serving 2 socket\(s\) from systemd socket activation")
        proc.wait_for(rf"listening on 127.0.0.1:{data_first.getsockname()[1]} \(data-first\)",
                      seen_too=True)
        assert echo_once(immediate.getsockname()[1], b"to the immediate one") == \
            b"to the immediate one"
        assert echo_once(data_first.getsockname()[1], b"first data") == b"first data"
        # The kernel's own defence is set on the handed data-first socket, as on a bound one.
        assert data_first.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert immediate.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) == 0
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0
    finally:
        proc.kill()
        immediate.close()
        data_first.close()


def test_variables_for_another_process_are_ignored() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert activated_sockets(environ) == []
    assert environ == {}  # consumed either way, so children never take them
