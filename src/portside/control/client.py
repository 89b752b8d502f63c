"""The client side: send one request to a server's control socket and return its result.

Before sending, the server is checked to run as this user or root (SO_PEERCRED): a socket
another user made at the path gets nothing from us. Root may talk to a server of any user (a
service's dynamic user, say): it can do anything to that process anyway.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from portside.control import protocol
from portside.control.paths import peer_uid
from portside.errors import ControlError, ProtocolError


def call(path: str, command: str, args: dict[str, Any] | None = None,
         timeout: float = 30.0) -> Any:
    """Send ``command`` to the server at ``path``; its result, or ControlError."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no portside server is listening on {path}") from None
        except TimeoutError:
            raise ControlError(f"{path} did not accept within {timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"cannot reach {path}: {exc.strerror or exc}") from None
        uid = peer_uid(sock)
        if os.getuid() != 0 and uid not in (os.getuid(), 0):
            raise ControlError(f"{path} is served by uid {uid}, not by you (uid {os.getuid()}) "
                               "or root; refusing to talk to it")
        try:
            sock.sendall(protocol.request(command, args))
        except OSError as exc:
            raise ControlError(f"cannot send to {path}: {exc.strerror or exc}") from None
        decoder = protocol.reply_decoder()
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                raise ControlError(f"no reply from {path} within {timeout:g} s") from None
            except OSError as exc:
                raise ControlError(f"{path}: {exc.strerror or exc}") from None
            if not data:
                raise ControlError(f"{path} closed the connection without a reply")
            try:
                for line in decoder.feed(data):
                    return protocol.parse_reply(line)
            except ProtocolError as exc:
                raise ControlError(str(exc)) from None
    finally:
        sock.close()
