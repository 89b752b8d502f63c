"""The compiled engine's classes: the compiled hot paths, with the reference's other methods.

Theory of operation. ``_compiled`` (Cython) holds the loop, the buffer and connection pools, the
deadline queues, and extension-type bases with the per-read and per-write methods and the life
cycle of ``Connection``, the accept loop of ``Listener`` and the per-connection methods of
``EngineCore``. Each class here derives from such a base and takes every method and property
the base does not define from the pure-Python class, unchanged: the PROXY header, TLS, the
timeouts' policies and statistics are written once and run on both engines. Those borrowed
methods are plain functions reading attributes by name; the bases declare every attribute of
the reference classes, so the functions cannot tell the difference. What the bases compile
(read, write, close, accept) is a twin of the reference, kept equal by
``tests/test_engine_differential.py`` (``_compiled.pyx``'s header lists what is shared).
``available()`` says whether the extension imports; ``reason_unavailable()`` why not.
"""

from __future__ import annotations

import types
from typing import Any, TypeVar, cast

from portside.engine.connection import Connection
from portside.engine.core import EngineCore
from portside.engine.listener import Listener

T = TypeVar("T")

try:
    from portside.engine._compiled import (
        EXTRA_FIELDS,
        FLAG_BITS,
        BufferPool,
        ConnectionBase,
        CoreBase,
        ListenerBase,
        Loop,
        ObjectPool,
        TimeoutTracker,
        set_connection_type,
    )
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _import_error = str(exc)
else:
    _import_error = ""


def available() -> bool:
    return not _import_error


def reason_unavailable() -> str:
    return _import_error


_NOT_BORROWED = frozenset({"__dict__", "__weakref__", "__slots__", "__module__", "__qualname__",
                           "__doc__", "__annotations__"})


def _borrow(target: type, reference: type, compiled: frozenset[str] = frozenset()) -> None:
    """Give ``target`` each method and property defined in ``reference`` itself, except the
    ``compiled`` ones (the extension-type base has them)."""
    for name, value in vars(reference).items():
        if name in _NOT_BORROWED or name in compiled or name in vars(target):
            continue  # the target's own definition wins
        if isinstance(value, types.MemberDescriptorType):  # a slot: the base declares it
            continue
        setattr(target, name, value)


def _flag(bit: int) -> property:
    """One of the reference's boolean attributes, as a bit of ``ConnectionBase._flags``."""
    return property(lambda conn: conn._get_flag(bit),
                    lambda conn, on: conn._set_flag(bit, on))


def _extra(field: str) -> property:
    """One of the reference's rarely set attributes, kept in the connection's ``Extras``."""
    return property(lambda conn: conn._get_extra(field),
                    lambda conn, value: conn._set_extra(field, value))


def _twin(compiled: type, reference: type[T]) -> type[T]:
    """``compiled`` as the type checker may see it, ``reference``: true once every method,
    property and attribute ``reference`` defines is ``compiled``'s too (else ImportError, and
    ``auto`` runs the pure engine). The stub says what the bases are; this says the rest."""
    missing = sorted(name for name in vars(reference)
                     if name not in _NOT_BORROWED and not hasattr(compiled, name)
                     and not isinstance(vars(reference)[name], types.MemberDescriptorType))
    if missing:
        raise ImportError(f"{compiled.__name__} lacks {reference.__name__}'s {missing}")
    return cast("type[T]", compiled)


if available():
    def _derive(name: str, base: type, doc: str, **attributes: Any) -> type:
        return type(name, (base,), {"__doc__": doc, "__module__": __name__, **attributes})

    _connection = _derive("CompiledConnection", ConnectionBase,
                          "``Connection`` with compiled read, write and life-cycle paths.",
                          __slots__=())
    _listener = _derive("CompiledListener", ListenerBase,
                        "``Listener`` with a compiled accept loop and deadline queues.",
                        tracker_class=TimeoutTracker)
    _core = _derive("CompiledCore", CoreBase,
                    "``EngineCore`` with compiled per-connection methods and pools.")
    for name, bit in FLAG_BITS.items():
        setattr(_connection, name, _flag(bit))
    for name, field in EXTRA_FIELDS.items():
        setattr(_connection, name, _extra(field))
    _borrow(_connection, Connection, frozenset(vars(ConnectionBase)))
    _borrow(_listener, Listener, frozenset(vars(ListenerBase)))
    _borrow(_core, EngineCore, frozenset(vars(CoreBase)))
    set_connection_type(_connection)
    CompiledConnection = _twin(_connection, Connection)
    CompiledListener = _twin(_listener, Listener)
    CompiledCore = _twin(_core, EngineCore)

__all__ = ["BufferPool", "CompiledConnection", "CompiledCore", "CompiledListener", "Loop",
           "ObjectPool", "available", "reason_unavailable"]
