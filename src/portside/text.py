"""Text a peer chose, made safe to show: in a log line, a ``ctl`` table, ``top``, an error.

A peer chooses its Unix socket path, the bytes a protocol error quotes, a PROXY header's
text. Shown raw, an ESC sequence retitles or clears an operator's terminal and a newline forges a
log line. ``printable`` escapes every character that is not printable (C0 and C1 controls,
DEL, newlines, line and paragraph separators, format characters such as bidi overrides) as
``\\xHH``/``\\uHHHH``, as nginx, HAProxy and Redis escape what they log. It leaves a backslash
as it is, so escaping twice changes nothing (a client may escape what a server already did);
a byte that was not valid UTF-8 (a surrogate escape) is shown as the byte, ``\\xHH``.
"""

from __future__ import annotations

__all__ = ["printable"]


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape: the original byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str | bytes) -> str:
    """``text`` with every non-printable character escaped (bytes are read as UTF-8, bad bytes
    as ``\\xHH``); printable text comes back unchanged, at the cost of one C-level check."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)
