"""Replies in request order, whatever order their work finishes in (the seed's sequence numbers).

Pure bookkeeping, no threads or sockets: each request takes the next sequence number when it
arrives; a finished result is held in a small reorder buffer until every earlier one has been
released. The buffer holds at most as many results as there are requests outstanding, which the
message layer bounds by pausing reads. The sequencer is also where the message layer keeps
its per-connection flow state: requests held back (``held``) and room left in the cork.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request produced: a reply, or the exception its work raised."""

    value: Any = None
    error: BaseException | None = None


class ReplySequencer:
    """Issues sequence numbers and releases outcomes strictly in that order."""

    __slots__ = ("_done", "close_when_drained", "cork_room", "held", "next_issue",
                 "next_release")

    def __init__(self) -> None:
        self.next_issue = 0
        self.next_release = 0
        self._done: dict[int, Outcome] = {}
        #: Requests decoded while the limit on outstanding ones was reached, not yet started.
        self.held: deque[Any] = deque()
        #: The peer has finished sending: close once every outstanding reply is out.
        self.close_when_drained = False
        #: In a corked pipelined batch: the reply bytes it may still take before the cork is
        #: flushed (high water at first); None when not corked.
        self.cork_room: int | None = None

    @property
    def outstanding(self) -> int:
        """Requests issued whose outcome has not been released yet."""
        return self.next_issue - self.next_release

    def issue(self) -> int:
        seq = self.next_issue
        self.next_issue += 1
        return seq

    def complete(self, seq: int, outcome: Outcome) -> list[Outcome]:
        """Record ``seq``'s outcome; return the outcomes now releasable, in order."""
        if not self.next_release <= seq < self.next_issue or seq in self._done:
            raise ValueError(f"sequence number {seq} is not outstanding")
        if seq != self.next_release:
            self._done[seq] = outcome
            return []
        ready = [outcome]
        self.next_release += 1
        while (following := self._done.pop(self.next_release, None)) is not None:
            ready.append(following)
            self.next_release += 1
        return ready
