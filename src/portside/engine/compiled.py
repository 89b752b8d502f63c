"""The compiled engine's classes: the compiled hot paths, with the reference's other methods.

Theory of operation. ``_compiled`` (Cython) holds the loop, the buffer pool, and extension-type
bases with the per-read and per-write methods of ``Connection`` and the accept loop of
``Listener``. Each class here derives from such a base and takes every method and property the
base does not define from the pure-Python class, unchanged: closing, PROXY headers, TLS,
timeouts and statistics are written once and behave the same on both engines. Those borrowed
methods are plain functions reading attributes by name; the bases declare every attribute of
the reference classes, so the functions cannot tell the difference. ``available()`` says
whether the extension imports; ``reason_unavailable()`` why not.
"""

from __future__ import annotations

import types
from typing import Any

from portside.engine.connection import Connection
from portside.engine.core import EngineCore
from portside.engine.listener import Listener
from portside.engine.tls import TlsConnection

try:
    from portside.engine import _compiled  # type: ignore[attr-defined]
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _compiled = None
    _import_error: str = str(exc)
else:
    _import_error = ""


def available() -> bool:
    return _compiled is not None


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


def _build() -> tuple[type[Any], type[Any], type[Any], type[Any]]:
    assert _compiled is not None

    class CompiledConnection(_compiled.ConnectionBase):  # type: ignore[misc]
        """``Connection`` with compiled read and write paths."""

        __slots__ = ()

    class CompiledTlsConnection(CompiledConnection):
        """``TlsConnection`` on the compiled engine (its reads go through TLS, in Python)."""

        __slots__ = TlsConnection.__slots__

    class CompiledListener(_compiled.ListenerBase):  # type: ignore[misc]
        """``Listener`` with a compiled accept loop and deadline queues."""

        tracker_class = _compiled.TimeoutTracker

    class CompiledCore(_compiled.CoreBase):  # type: ignore[misc]
        """``EngineCore`` with compiled per-connection methods and pools."""

    _borrow(CompiledConnection, Connection, frozenset(vars(_compiled.ConnectionBase)))
    # TLS reads and writes go through the SSL object: its Python overrides win here.
    _borrow(CompiledTlsConnection, TlsConnection)
    _borrow(CompiledListener, Listener, frozenset(vars(_compiled.ListenerBase)))
    _borrow(CompiledCore, EngineCore, frozenset(vars(_compiled.CoreBase)))
    _compiled.set_connection_type(CompiledConnection)
    return CompiledConnection, CompiledTlsConnection, CompiledListener, CompiledCore


if _compiled is not None:
    CompiledConnection, CompiledTlsConnection, CompiledListener, CompiledCore = _build()
    Loop = _compiled.Loop
    BufferPool = _compiled.BufferPool
    ObjectPool = _compiled.ObjectPool
