"""Every public entry point of the compiled RESP framer, called directly and in any order, with
any bytes, against its pure twin: the same results, the same errors, and never a read past the
input (run it under AddressSanitizer, docs/development.md, to see that last one in C).

``feed`` is what a server calls; ``split``, ``check_pending``, ``eof``, ``need`` and the rest are
public too, and a caller may use them wrongly (a ``split`` with less than ``need``, a shorter
input than before, a ``need`` set by hand). Where the pure framer has a twin the two are compared;
``serve``, ``resume`` and ``rest`` (the compiled fast path, whose twin is the RESP example's
Python commands, compared in test_resp.py) must only never fail but by their documented errors.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import IN_CI
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from portside.errors import ProtocolError
from portside.protocols.resp import CompiledRespFramer, RespFramer

try:  # the RESP example's compiled fast path: the library framer with a store's answers
    from portside.examples._resp_store import StoreFramer
except ImportError:
    StoreFramer = None  # type: ignore[assignment,misc]

#: conftest's one rule: off CI a missing compiled framer skips these; in CI they fail.
pytestmark = pytest.mark.skipif(CompiledRespFramer is None and not IN_CI,
                                reason="the compiled framer is not built")

# Bytes that reach every branch: headers, lengths, CRLFs, inline text, quotes, garbage.
PIECES = st.sampled_from([b"*", b"$", b"\r\n", b"\r", b"\n", b"1", b"2", b"3", b"0", b"-1",
                          b"10", b"99999999999999999999", b"PING", b"SET", b"k", b"v", b" ",
                          b'"', b"'", b"\x00", b"\xff", b"*1\r\n$4\r\nPING\r\n",
                          b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"$5\r\nhel", b"lo\r\n"])
DATA = st.lists(st.one_of(PIECES, st.binary(max_size=6)), max_size=8).map(b"".join)
LIMITS = st.tuples(st.integers(1, 64), st.integers(1, 8), st.integers(1, 256),
                   st.integers(1, 64))


def outcome(call: Any, *args: Any) -> tuple[str, Any]:
    """What a call gave: its result, or its error's type and text."""
    try:
        return ("ok", call(*args))
    except (ProtocolError, RuntimeError, ValueError) as exc:
        return (type(exc).__name__, str(exc))


def state(framer: Any) -> tuple[Any, ...]:
    return (framer.buffered, framer.need, str(framer.error))


class Twins(RuleBasedStateMachine):
    """The pure and the compiled framer, driven through the same calls."""

    @initialize(limits=LIMITS)
    def make(self, limits: tuple[int, int, int, int]) -> None:
        assert CompiledRespFramer is not None
        self.pure = RespFramer(*limits)
        self.compiled = CompiledRespFramer(*limits)

    def same(self, name: str, *args: Any) -> None:
        expected = outcome(getattr(self.pure, name), *args)
        got = outcome(getattr(self.compiled, name), *args)
        assert got == expected, (name, args)
        assert state(self.compiled) == state(self.pure), (name, args)

    @rule(data=DATA)
    def feed(self, data: bytes) -> None:
        self.same("feed", data)

    @rule(data=DATA, offset=st.integers(0, 4))
    def split(self, data: bytes, offset: int) -> None:
        # A view into a larger buffer, as the engine lends them: reading past it is a bug
        # even where the bytes after it exist.
        buffer = bytearray(b"#" * offset + data + b"\r\n$9\r\n")
        view = memoryview(buffer)[offset:offset + len(data)]
        pure: list[Any] = []
        compiled: list[Any] = []
        expected = outcome(self.pure.split, view, pure)
        got = outcome(self.compiled.split, view, compiled)
        assert (got, compiled) == (expected, pure), data
        assert state(self.compiled) == state(self.pure), data

    @rule(size=st.integers(0, 1 << 20))
    def check_pending(self, size: int) -> None:
        self.same("check_pending", size)

    @rule()
    def eof(self) -> None:
        self.same("eof")

    @rule(need=st.integers(0, 40))
    def set_need(self, need: int) -> None:
        self.pure.need = need
        self.compiled.need = need

    @rule(message=st.lists(st.binary(max_size=4), max_size=3))
    def detach_and_encode(self, message: list[bytes]) -> None:
        self.same("detach", message)
        self.same("encode", message)


TestTwins = Twins.TestCase
TestTwins.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)


class FastPath(RuleBasedStateMachine):
    """The compiled framers' own entry points (the library's, and the RESP example's that
    answers from a store), misused on purpose: only documented errors."""

    @initialize(limits=LIMITS, with_store=st.booleans())
    def make(self, limits: tuple[int, int, int, int], with_store: bool) -> None:
        assert CompiledRespFramer is not None and StoreFramer is not None
        self.framer: Any = (StoreFramer({}, {}, *limits) if with_store
                            else CompiledRespFramer(*limits))

    @rule(data=DATA, resp3=st.booleans(), limit=st.integers(-1, 64))
    def serve(self, data: bytes, resp3: bool, limit: int) -> None:
        if isinstance(self.framer, StoreFramer):
            self.framer.resp3 = resp3
        outcome(self.framer.serve, data, limit)

    @rule(data=DATA, limit=st.integers(-1, 64))
    def resume(self, data: bytes, limit: int) -> None:
        outcome(self.framer.resume, data, limit)

    @rule(data=DATA)
    def rest(self, data: bytes) -> None:
        outcome(self.framer.rest, data)

    @rule(data=DATA)
    def feed(self, data: bytes) -> None:
        outcome(self.framer.feed, data)

    @rule(data=DATA)
    def split(self, data: bytes) -> None:
        outcome(self.framer.split, memoryview(bytearray(data)), [])

    @rule(need=st.integers(0, 40))
    def set_need(self, need: int) -> None:
        self.framer.need = need

    @rule()
    def eof(self) -> None:
        outcome(self.framer.eof)
        assert self.framer.buffered >= 0


TestFastPath = FastPath.TestCase
TestFastPath.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
