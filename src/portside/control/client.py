"""The client side: ``portside ctl`` sends one command and prints the reply."""

from __future__ import annotations

import socket
from typing import Any

from portside.control import protocol


class ControlError(Exception):
    """The server could not be reached, or it answered with an error."""


def send_command(path: str, command: str, timeout: float = 30.0) -> Any:
    """Send ``command`` to the server at ``path``; return its result or raise ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no portside server is listening on {path}") from None
        except OSError as exc:
            raise ControlError(f"cannot reach {path}: {exc.strerror}") from None
        sock.sendall(protocol.request(command))
        decoder = protocol.LineDecoder()
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"no reply from {path} within {timeout:g} s") from None
            if not data:
                raise ControlError(f"{path} closed the connection without a reply")
            for line in decoder.feed(data):
                try:
                    if isinstance(line, protocol.ProtocolError):
                        raise line
                    return protocol.parse_reply(line)
                except protocol.ProtocolError as exc:
                    raise ControlError(str(exc)) from None
    finally:
        sock.close()
