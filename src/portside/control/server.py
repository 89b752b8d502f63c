"""The server side of the control socket: a Unix socket, mode 0600, served on a Reactor.

It knows nothing of what the commands do: each parsed command goes to a ``ControlTarget``
(a single Server, or the supervisor of many workers), which answers when it can, possibly
later (the supervisor first asks its workers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Protocol

from portside.control import protocol
from portside.engine.reactor import Reactor
from portside.engine.service import ServiceClient, SideClient, SideListener
from portside.errors import ListenError

logger = logging.getLogger("portside.control")

MAX_CLIENTS = 16  # control clients are people and scripts: a few at a time


class ControlTarget(Protocol):
    def control(self, command: str, respond: Callable[[bytes], None]) -> None:
        """Carry out ``command`` and call ``respond`` once with an encoded reply."""
        ...


def default_control_path() -> str:
    """Where the control socket lives when ``--control`` is not given."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"portside-{os.getuid()}.ctl")


def bind_control_socket(path: str) -> socket.socket:
    """Bind ``path`` with mode 0600; a stale socket file is replaced, a live one is an error."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        else:
            raise ListenError(f"control socket {path} is in use by another server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is open to others
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot create control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


class ControlChannel(SideClient):
    """One connected control peer: decodes its requests, hands them to ``target``, and sends
    the replies in order. Also the worker's end of its link to the supervisor."""

    def __init__(self, sock: socket.socket, target: ControlTarget, reactor: Reactor,
                 on_close: Callable[[ControlChannel], None]) -> None:
        super().__init__(sock, reactor, on_close)  # type: ignore[arg-type]
        self.target = target
        self.decoder = protocol.LineDecoder()

    def received(self, data: bytes) -> None:
        for line in self.decoder.feed(data):
            try:
                if isinstance(line, protocol.ProtocolError):
                    raise line
                command = protocol.parse_request(line)
            except protocol.ProtocolError as exc:
                self.send(protocol.reply_error(str(exc)))
                continue
            try:
                self.target.control(command, self.send)
            except Exception as exc:  # the target's bug must not take the server down
                logger.exception("control command %r failed", command)
                self.send(protocol.reply_error(f"{command} failed: {exc}"))


class ControlServer(SideListener):
    """Accepts control clients on a Unix socket and hands their commands to ``target``."""

    def __init__(self, path: str, target: ControlTarget) -> None:
        self.path = path
        self.target = target
        super().__init__(bind_control_socket(path), self._client, MAX_CLIENTS)

    def _client(self, sock: socket.socket, reactor: Reactor,
                on_close: Callable[[ServiceClient], None]) -> ControlChannel:
        return ControlChannel(sock, self.target, reactor, on_close)

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
