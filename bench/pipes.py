"""Reading a child's announcement line without ever blocking past a deadline."""

from __future__ import annotations

import os
import select
import time


class NoLineError(RuntimeError):
    """The child printed no full line in time, or closed its output first."""


def read_line(fd: int, timeout: float) -> str:
    """The first line written to pipe ``fd``, waiting at most ``timeout`` seconds.

    Reads the descriptor itself a byte at a time (not through a buffered file object), so
    whatever follows the line stays in the pipe for a later ``communicate()``.
    """
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoLineError(f"no line within {timeout:.0f} s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1)  # one byte at a time: never swallow what follows the line
        if not chunk:
            raise NoLineError(f"output closed before a full line (got {data!r})")
        data += chunk
    return data[:-1].decode()
