"""The server side of the control socket: a Unix socket, mode 0600, served on a Reactor.

It knows nothing of what the commands do: each checked request goes to a ``ControlTarget``
(a single Server, or the supervisor of many workers), which answers when it can, possibly
later (the supervisor first asks its workers). Requests from one client are answered in order,
one at a time. A client must be this user or root (SO_PEERCRED), must send a whole request
within ``CLIENT_TIMEOUT`` of connecting or of its last reply, and a newcomer to a full table
takes the place of the oldest idle client (``engine.service``), so idle or silent clients cannot
lock ``portside ctl`` out. Every command that changes something is logged with the caller's uid.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

from portside.control import protocol
from portside.control.paths import ControlSocket, peer_uid
from portside.engine.reactor import Reactor
from portside.engine.service import ServiceClient, SideClient, SideListener
from portside.errors import ProtocolError

logger = logging.getLogger("portside.control")

MAX_CLIENTS = 16  # control clients are people and scripts: a few at a time
CLIENT_TIMEOUT = 10.0  # seconds to send a whole request
MAX_QUEUED = 8  # requests a client may pipeline behind the one being answered


class ControlTarget(Protocol):
    def control(self, request: protocol.Request, respond: Callable[[bytes], None]) -> None:
        """Carry out ``request`` and call ``respond`` once with an encoded reply."""
        ...


class ControlChannel(SideClient):
    """One connected control peer: decodes its requests, hands them to ``target`` one at a
    time, and sends the replies in order. Also the worker's end of its link to the supervisor
    (``timeout`` None, ``uid`` None: the supervisor, which logs actions itself)."""

    def __init__(self, sock: socket.socket, target: ControlTarget, reactor: Reactor,
                 on_close: Callable[[ControlChannel], None], timeout: float | None = None,
                 uid: int | None = None) -> None:
        super().__init__(sock, reactor, on_close, timeout)  # type: ignore[arg-type]
        self.target = target
        self.uid = uid
        self.decoder = protocol.request_decoder()
        self.queued: deque[bytes] = deque()
        #: Why this client is turned away as soon as it is registered (a stranger's uid).
        self.refusal: str | None = None

    def start(self) -> None:
        if self.refusal is not None:
            self.fail(self.refusal)

    def received(self, data: bytes) -> None:
        try:
            lines = self.decoder.feed(data)
        except ProtocolError as exc:  # over-long: say so, then hang up
            self.fail(str(exc))
            return
        self.queued.extend(bytes(line) for line in lines)
        if self.decoder.error is not None:  # a bad frame after these lines
            self.queued.append(b"")
        if len(self.queued) > MAX_QUEUED:
            self.stop_reading()
        self._next()

    def fail(self, error: str) -> None:
        self.queued.clear()
        self.close_when_sent = True
        self.send(protocol.reply_error(error))

    def expired(self) -> None:
        self._timer = None
        if self.outgoing or self.close_when_sent:
            self.close()  # it does not take what we send: hang up
            return
        self.fail(f"no whole request within {self.timeout:g} s")
        self.renew()  # a period to take the error reply; then it is closed

    def _next(self) -> None:
        while self.queued and not self.answering and not self.outgoing and not self.closed:
            line = self.queued.popleft()
            if not line and self.decoder.error is not None:
                self.fail(str(self.decoder.error))
                return
            try:
                request = protocol.parse_request(line, self.uid)
            except ProtocolError as exc:
                self.send(protocol.reply_error(str(exc)))
                continue
            self.answering = True
            if self.uid is not None and protocol.COMMANDS[request.command].action:
                logger.info("control: uid %d asked for %s%s", self.uid, request.command,
                            "".join(f" {key}={value}" for key, value in request.args.items()))
            try:
                self.target.control(request, self._answer)
            except Exception as exc:  # the target's bug must not take the server down
                logger.exception("control command %r failed", request.command)
                self._answer(protocol.reply_error(f"{request.command} failed: {exc}"))

    def _answer(self, reply: bytes) -> None:
        if not self.answering:
            return  # answered twice: the first one counts
        self.answering = False
        self.send(reply)
        if not self.closed and not self.outgoing:
            self._ready_for_more()

    def handle_write(self) -> None:
        waiting = bool(self.outgoing)
        super().handle_write()
        if waiting and not self.outgoing and not self.closed and not self.answering \
                and not self.close_when_sent:
            self._ready_for_more()

    def _ready_for_more(self) -> None:
        """The last reply has left: a new period, and the next request. A client that does
        not take its replies gets no more answers, and its deadline runs out."""
        self.renew()
        if not self.reading and len(self.queued) <= MAX_QUEUED:
            self.reading = True
            self.reactor.modify(self.fd, readable=True, writable=bool(self.outgoing))
        self._next()


class ControlServer(SideListener):
    """Accepts control clients on a ``ControlSocket`` and hands their requests to ``target``;
    closing it removes the socket file."""

    def __init__(self, control: ControlSocket, target: ControlTarget,
                 client_timeout: float = CLIENT_TIMEOUT) -> None:
        self.control = control
        self.target = target
        self.client_timeout = client_timeout
        super().__init__(control.sock, self._client, MAX_CLIENTS)

    def _client(self, sock: socket.socket, reactor: Reactor,
                on_close: Callable[[ServiceClient], None]) -> ControlChannel:
        uid = peer_uid(sock)
        channel = ControlChannel(sock, self.target, reactor, on_close, self.client_timeout,
                                 uid)
        if uid not in (os.getuid(), 0):
            logger.warning("control: refused a client of uid %d", uid)
            channel.refusal = f"uid {uid} may not control this server"
        return channel

    @property
    def path(self) -> str:
        return self.control.path  # an upgraded supervisor renames the one it was handed

    def attach(self, reactor: Reactor) -> None:
        super().attach(reactor)
        logger.info("control socket %s", self.path)

    def close(self) -> None:
        super().close()
        self.control.close()

    def close_in_child(self) -> None:
        super().close_in_child()
        self.control.close_in_child()
