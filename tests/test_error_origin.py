"""``Handler.error`` says where an error came from (``ErrorOrigin``): the handler's callbacks,
its offloaded work, or portside's own PROXY and TLS layers; two-argument overrides keep
working. portside's layers are made to fail by replacing one of their functions (a stand-in
for a bug), never by mocking a socket: the bytes still travel over loopback."""

from __future__ import annotations

import contextlib
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT, Clients, RecordingHandler, ServeFactory
from test_tls import certificate, client, server_context  # noqa: F401 (a fixture)

import portside.engine.connection as connection_module
from portside import Connection, ErrorOrigin, Handler, ListenerConfig, MessageHandler
from portside.engine.tls import TlsSession
from portside.handler import report_error
from portside.protocols.proxy import encode_v1

TRUST = ("127.0.0.1/32",)


class OriginHandler(RecordingHandler):
    """Records each error with its origin; raises in data_received when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.expect_errors = True
        self.raise_in_data = False
        self.origins: list[ErrorOrigin] = []

    def data_received(self, conn: Connection, data: memoryview) -> None:
        if self.raise_in_data:
            raise KeyError("the handler's own bug")
        super().data_received(conn, data)

    def error(self, conn: Connection | None, exc: BaseException, *,
              origin: ErrorOrigin = ErrorOrigin.CALLBACK) -> None:
        with self._cond:
            self.origins.append(origin)
        super().error(conn, exc)

    def one_error(self) -> tuple[BaseException, ErrorOrigin]:
        self.wait(lambda: len(self.errors) >= 1, "an error report")
        assert len(self.errors) == 1, self.errors
        return self.errors[0], self.origins[0]


def expect_end(sock: Any) -> None:
    """The server ended the connection (RST or FIN)."""
    with contextlib.suppress(ConnectionResetError, ssl.SSLError):
        assert sock.recv(100) == b""


def test_a_callback_error_is_the_handlers(serve: ServeFactory, clients: Clients) -> None:
    handler = OriginHandler()
    handler.raise_in_data = True
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"x")
    exc, origin = handler.one_error()
    assert isinstance(exc, KeyError) and origin is ErrorOrigin.CALLBACK
    expect_end(sock)


def test_two_argument_overrides_still_work(serve: ServeFactory, clients: Clients) -> None:
    """RecordingHandler.error is ``error(self, conn, exc)``, as handlers were written before."""

    class Old(RecordingHandler):
        def data_received(self, conn: Connection, data: memoryview) -> None:
            raise KeyError("boom")

    handler = Old()
    handler.expect_errors = True
    rs = serve(ListenerConfig(), handler=handler)
    clients.connect(rs.address()).sendall(b"x")
    handler.wait(lambda: len(handler.errors) == 1, "the report")
    assert isinstance(handler.errors[0], KeyError)


def test_report_error_passes_origin_only_to_those_that_take_it() -> None:
    got: list[Any] = []

    class Keyword(Handler):
        def error(self, conn: Connection | None, exc: BaseException,
                  **extra: Any) -> None:
            got.append(extra)

    class Plain(Handler):
        def error(self, conn: Connection | None, exc: BaseException) -> None:
            got.append("plain")

    report_error(Keyword(), None, ValueError(), ErrorOrigin.TLS)
    report_error(Plain(), None, ValueError(), ErrorOrigin.TLS)
    report_error(Plain(), None, ValueError(), ErrorOrigin.READ)  # looked up once, same answer
    assert got == [{"origin": ErrorOrigin.TLS}, "plain", "plain"]


def test_a_bug_in_proxy_parsing_is_never_the_handlers(
        serve: ServeFactory, clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: Any, accept: Any) -> Any:
        raise IndexError("portside's own PROXY bug")

    monkeypatch.setattr(connection_module, "parse_proxy_header", broken)
    handler = OriginHandler()
    rs = serve(ListenerConfig(proxy_protocol="v1", trusted_proxies=TRUST),  # type: ignore[arg-type]
               handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(encode_v1(("10.0.0.1", 1000), ("10.0.0.2", 80)) + b"hello")
    exc, origin = handler.one_error()
    assert isinstance(exc, IndexError) and origin is ErrorOrigin.PROXY
    expect_end(sock)


def test_the_handlers_error_after_a_proxy_header_is_the_handlers(
        serve: ServeFactory, clients: Clients) -> None:
    """The bytes after the header arrive in the same read and reach data_received from
    inside the PROXY layer: the handler's exception there is still the handler's."""
    handler = OriginHandler()
    handler.raise_in_data = True
    rs = serve(ListenerConfig(proxy_protocol="v1", trusted_proxies=TRUST),  # type: ignore[arg-type]
               handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(encode_v1(("10.0.0.1", 1000), ("10.0.0.2", 80)) + b"hello")
    exc, origin = handler.one_error()
    assert isinstance(exc, KeyError) and origin is ErrorOrigin.CALLBACK
    expect_end(sock)


def test_a_bad_proxy_header_is_no_error(serve: ServeFactory, clients: Clients) -> None:
    """A peer's malformed header is counted and logged, not reported as anyone's bug."""
    handler = OriginHandler()
    rs = serve(ListenerConfig(proxy_protocol="v1", trusted_proxies=TRUST),  # type: ignore[arg-type]
               handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"PROXY NONSENSE\r\n")
    expect_end(sock)
    assert rs.server.statistics().listeners[0].proxy_errors == 1
    assert handler.errors == []


def test_the_handlers_error_under_tls_is_the_handlers(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path]) -> None:  # noqa: F811
    handler = OriginHandler()
    handler.raise_in_data = True
    rs = serve(ListenerConfig(tls=server_context(certificate)), handler=handler)
    sock = client(clients, rs.address(), certificate)
    sock.sendall(b"hello")
    exc, origin = handler.one_error()
    assert isinstance(exc, KeyError) and origin is ErrorOrigin.CALLBACK
    expect_end(sock)


def test_a_bug_in_the_tls_layer_is_portsides(
        serve: ServeFactory, clients: Clients, certificate: tuple[Path, Path],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = TlsSession.receive

    def receive(self: TlsSession, conn: connection_module.Connection, data: memoryview) -> None:
        if self.handshaken:
            raise AttributeError("portside's own TLS bug")
        real(self, conn, data)

    monkeypatch.setattr(TlsSession, "receive", receive)
    handler = OriginHandler()
    rs = serve(ListenerConfig(tls=server_context(certificate)), handler=handler)
    sock = client(clients, rs.address(), certificate)
    sock.sendall(b"hello")
    exc, origin = handler.one_error()
    assert isinstance(exc, AttributeError) and origin is ErrorOrigin.TLS
    expect_end(sock)


class Offloading(MessageHandler[Any]):
    """Offloads each line; its result cannot be encoded (a str where bytes are needed)."""

    def __init__(self) -> None:
        self.reported: list[tuple[BaseException, ErrorOrigin]] = []
        self.done = threading.Event()

    def message_received(self, conn: Connection, message: Any) -> None:
        self.offload(conn, lambda: 12345)

    def encode_reply(self, conn: Connection, reply: Any) -> list[Any]:
        raise TypeError(f"cannot encode {reply!r}")

    def error(self, conn: Connection | None, exc: BaseException, *,
              origin: ErrorOrigin = ErrorOrigin.CALLBACK) -> None:
        self.reported.append((exc, origin))
        self.done.set()


def test_offloaded_work_that_fails_is_offload(serve: ServeFactory, clients: Clients) -> None:
    handler = Offloading()
    rs = serve(ListenerConfig(), handler=handler)
    sock = clients.connect(rs.address())
    sock.sendall(b"work\n")
    assert handler.done.wait(WAIT)
    [(exc, origin)] = handler.reported
    assert isinstance(exc, TypeError) and origin is ErrorOrigin.OFFLOAD
    expect_end(sock)


def test_default_error_log_names_the_origin(serve: ServeFactory, clients: Clients,
                                            caplog: pytest.LogCaptureFixture) -> None:
    class Raises(Handler):
        def data_received(self, conn: Connection, data: memoryview) -> None:
            raise KeyError("logged")

    rs = serve(ListenerConfig(), handler=Raises())
    sock = clients.connect(rs.address())
    sock.sendall(b"x")
    expect_end(sock)
    assert any("error (callback) on connection" in record.getMessage()
               for record in caplog.records), caplog.text
