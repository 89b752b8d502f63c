"""The settings' declarations and the value parsers derived from them: pure tests, no sockets."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portside.config import (
    INT_MAX,
    AcceptPolicy,
    Count,
    Engine,
    ListenerConfig,
    ProcessConfig,
    Seconds,
    ServerConfig,
    parse_host_port,
    parse_listen,
    settings_of,
)
from portside.errors import ConfigError
from portside.settings import add_flags, resolve

HOSTS = st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "::1", "::", "fe80::1"])


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@given(HOSTS, st.integers(0, 65535), st.sampled_from(list(AcceptPolicy)))
def test_listen_round_trip(host: str, port: int, policy: AcceptPolicy) -> None:
    listener = parse_listen(f"{policy.value}@{_bracketed(host)}:{port}")
    assert (listener.host, listener.port, listener.policy) == (host, port, policy)
    assert parse_listen(listener.address).address == listener.address


@given(HOSTS, st.one_of(st.integers(max_value=-1), st.integers(min_value=65536)))
def test_ports_outside_the_range_never_wrap(host: str, port: int) -> None:
    with pytest.raises(ConfigError, match="0-65535"):
        parse_host_port(f"{_bracketed(host)}:{port}")


@given(st.integers(0, 65535))
def test_colon_port_is_loopback_for_everything(port: int) -> None:
    assert parse_host_port(f":{port}") == ("127.0.0.1", port)
    assert parse_listen(f":{port}").host == "127.0.0.1"


@given(st.integers())
def test_counts_are_bounded(value: int) -> None:
    kind = Count(0, INT_MAX)
    if 0 <= value <= INT_MAX:
        assert kind.parse(str(value)) == value
    else:
        with pytest.raises(ValueError, match=str(INT_MAX)):
            kind.parse(str(value))


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_positive_seconds(value: float) -> None:
    kind = Seconds(positive=True)
    if 0 < value <= 366 * 86400:
        assert kind.parse(repr(value)) == value
    else:
        with pytest.raises(ValueError, match="> 0"):
            kind.parse(repr(value))


def test_unix_and_fd_forms() -> None:
    assert parse_listen("data-first@unix:/tmp/a.sock").path == "/tmp/a.sock"
    assert parse_listen("fd://7").fd == 7
    for bad in ("unix:", "fd://", "fd://-1", "127.0.0.1", "[::1:80", "::1:80"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def test_every_field_a_user_tunes_is_a_setting() -> None:
    """Fields without a declaration are only the ones --listen and --certfile fill in."""
    for cls, not_settings in ((ListenerConfig, {"host", "port", "path", "policy", "name", "fd",
                                                "tls", "handler"}),
                              (ServerConfig, set()), (ProcessConfig, set())):
        declared = {setting.name for setting in settings_of(cls)}
        fields = set(cls.__dataclass_fields__)
        assert fields - declared == not_settings, cls


def test_checks_come_from_the_declaration_in_python_too() -> None:
    with pytest.raises(ConfigError, match="defer_accept must be a whole number 0-2147483647"):
        ListenerConfig(defer_accept=2**31)
    with pytest.raises(ConfigError, match="heartbeat_timeout must be a number of seconds > 0"):
        ProcessConfig(heartbeat_timeout=0)
    assert ServerConfig(engine="uvloop").engine is Engine.UVLOOP  # type: ignore[arg-type]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(argv)


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    config = tmp_path / "portside.toml"
    config.write_text('idle-timeout = 1\nmax_connections = 5\nengine = "asyncio"\n'
                      'listen = ["data-first@:1"]\n')
    environ = {"PORTSIDE_MAX_CONNECTIONS": "6", "PORTSIDE_ENGINE": "uvloop",
               "PORTSIDE_LISTEN": ":2 unix:/tmp/x.sock"}
    resolved = resolve(_parse("--config", str(config), "--engine", "epoll"), environ)
    assert resolved.listener == {"idle_timeout": 1.0, "max_connections": 6}
    assert resolved.server.engine is Engine.EPOLL
    assert resolved.process.listen == (":2", "unix:/tmp/x.sock")
    resolved = resolve(_parse("--config", str(config), "-b", ":3", "--bind", ":4"), environ)
    assert resolved.process.listen == (":3", ":4")
    assert resolve(_parse("--graceful-timeout", "3"), {}).server.drain_timeout == 3.0
