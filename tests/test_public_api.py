"""The connection a handler is typed against: every engine's connection offers all of it, and it
offers none of the engine's own methods."""

from __future__ import annotations

import pytest

import portside
from portside.connection import Connection, LayerConnection
from portside.engine import compiled
from portside.engine.connection import Connection as EngineConnection

#: What the engine drives a connection with; a handler must not be offered these.
ENGINE_ONLY = {"attach", "establish", "handle_read", "handle_write", "close_for", "abort_for",
               "hold_reading", "layer"}


def _members(protocol: type) -> set[str]:
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (object,) or klass.__name__ in ("Protocol", "Generic"):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
        names |= set(getattr(klass, "__annotations__", {}))
    return names


def _engine_classes() -> list[type]:
    classes: list[type] = [EngineConnection]
    if compiled.available():
        classes.append(compiled.CompiledConnection)
    return classes


def test_handlers_are_typed_against_the_public_interface() -> None:
    assert portside.Connection is Connection
    assert not _members(Connection) & ENGINE_ONLY
    assert ENGINE_ONLY - {"attach", "establish", "handle_read", "handle_write"} <= \
        _members(LayerConnection)


@pytest.mark.parametrize("engine_class", _engine_classes(), ids=lambda c: c.__name__)
def test_every_engine_connection_offers_the_whole_interface(engine_class: type) -> None:
    missing = {name for name in _members(LayerConnection) if not hasattr(engine_class, name)}
    assert not missing, f"{engine_class.__name__} lacks {sorted(missing)}"


def _statically_conforms(conn: EngineConnection) -> tuple[Connection, LayerConnection]:
    """mypy --strict checks this: the engine's class is both interfaces, structurally."""
    return conn, conn
