"""Parsers do linear work: a large message trickled in small pieces costs about what it costs in
one piece (issue 9). A parser that rescans or copies its pending buffer on every read costs
quadratic CPU here (RESP: ~20 s against ~0.05 s), so the bound below misses such a parser by
far while leaving room for a loaded machine. CPU time of this thread, not wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from portside.protocols.framing import Framer, LengthPrefixFramer, LineFramer
from portside.protocols.resp import RespFramer

PIECE = 1024


def encode_command(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def parse_cpu(make: Callable[[], Framer[Any]], stream: bytes, piece: int) -> tuple[float, int]:
    """CPU seconds to feed ``stream`` in ``piece``-byte reads, and how many messages came out."""
    framer = make()
    pieces = [memoryview(stream)[at:at + piece] for at in range(0, len(stream), piece)]
    count = 0
    started = time.thread_time()
    for chunk in pieces:
        count += len(framer.feed(chunk))
    framer.eof()
    return time.thread_time() - started, count


CASES: dict[str, tuple[Callable[[], Framer[Any]], bytes]] = {
    # 65,536 arguments in one command (issue 9's example): ~760 KB.
    "resp-arguments": (lambda: RespFramer(), encode_command([b"x%d" % i for i in range(65536)])),
    # One 4 MiB bulk string: its body is waited for, not re-read.
    "resp-bulk": (lambda: RespFramer(),
                  encode_command([b"SET", b"k", b"v" * (4 * 1024 * 1024)])),
    # A 60 KB inline line: only its new bytes are searched for the newline.
    "resp-inline": (lambda: RespFramer(), b"SET k " + b"v" * 60_000 + b"\r\n"),
    # A 4 MiB line, and a 4 MiB length-prefixed message.
    "line": (lambda: LineFramer(max_length=8 * 1024 * 1024), b"x" * (4 * 1024 * 1024) + b"\n"),
    "length-prefix": (lambda: LengthPrefixFramer(4, max_size=8 * 1024 * 1024),
                      (4 * 1024 * 1024).to_bytes(4, "big") + b"y" * (4 * 1024 * 1024)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trickled_message_costs_about_what_one_piece_costs(case: str) -> None:
    make, stream = CASES[case]
    piece = 16 if case == "resp-inline" else PIECE  # an inline line is short: cut it finer
    whole, whole_count = parse_cpu(make, stream, len(stream))
    trickled, trickled_count = parse_cpu(make, stream, piece)
    assert whole_count == trickled_count == 1
    # Linear: the per-read overhead of ~4,000 reads, plus a constant factor. Quadratic: seconds.
    assert trickled <= 5 * whole + 0.3, (case, whole, trickled)
