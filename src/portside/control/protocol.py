"""The control protocol, sans-IO: one JSON object per line, both ways.

A request is ``{"v": 1, "command": "close", "args": {"id": "17"}}``; a reply is
``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error": "..."}``. Lines are
split by ``portside.protocols.framing.LineFramer`` (one line decoder in portside), capped at
``MAX_REQUEST`` bytes one way and ``MAX_REPLY`` the other. ``parse_request`` checks a line
against ``COMMANDS`` (names, argument types and ranges) and raises ``ProtocolError`` (the one in
``portside.errors``) for anything else: malformed JSON, an over-long number, deep nesting.
No sockets, no clocks.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from portside.errors import ProtocolError
from portside.protocols.framing import LineFramer

VERSION = 1
MAX_REQUEST = 64 * 1024  # a request is tiny
MAX_REPLY = 16 * 1024 * 1024  # a connection listing of thousands stays far below this
MAX_LIST = 10_000  # connections one ``connections`` reply lists at most
LOG_LEVELS = ("debug", "info", "warning", "error")
CONNECTION_STATES = ("pending", "open", "closing")


# Named tuples, not dataclasses: ``portside ctl`` imports this module, and dataclasses (with
# inspect) would cost it more than the rest of its imports together.


class Argument(NamedTuple):
    """One argument of a command: its type, whether it must be given, and its bounds."""

    kind: type
    required: bool = False
    low: int = 0
    high: int = 2**31 - 1
    choices: tuple[str, ...] = ()


class Command(NamedTuple):
    help: str
    arguments: dict[str, Argument] = {}  # noqa: RUF012 (never changed: read only)
    #: Changes what the server does (logged with the caller's uid), rather than only reading.
    action: bool = True


_LISTENER = Argument(str)
COMMANDS: dict[str, Command] = {
    "stats": Command("statistics of every listener, worker and pool", action=False),
    "connections": Command(
        "list open connections (filters: listener, state, peer substring)",
        {"listener": _LISTENER, "state": Argument(str, choices=CONNECTION_STATES),
         "peer": Argument(str), "limit": Argument(int, low=1, high=MAX_LIST)}, action=False),
    "pause": Command("stop accepting (on one listener, or all)", {"listener": _LISTENER}),
    "resume": Command("accept again (on one listener, or all)", {"listener": _LISTENER}),
    "drain": Command("stop accepting and let the open connections finish"),
    "close": Command("close one connection gracefully (queued bytes sent, then FIN)",
                     {"id": Argument(str, required=True)}),
    "abort": Command("reset one connection now (RST, queued bytes dropped)",
                     {"id": Argument(str, required=True)}),
    "max-connections": Command(
        "change max_connections (on one listener, or all)",
        {"value": Argument(int, required=True, low=1), "listener": _LISTENER}),
    "log-level": Command("change the log level",
                         {"level": Argument(str, required=True, choices=LOG_LEVELS)}),
    "shutdown": Command("shut down gracefully"),
}


class Request(NamedTuple):
    """A checked request; ``uid`` is the caller's (from SO_PEERCRED), None when unknown."""

    command: str
    args: dict[str, Any] = {}  # noqa: RUF012 (never changed: read only)
    uid: int | None = None

    def get(self, name: str) -> Any:
        return self.args.get(name)


def request_decoder() -> LineFramer:
    """Splits what a control client sends into request lines."""
    return LineFramer(max_length=MAX_REQUEST)


def reply_decoder() -> LineFramer:
    """Splits what a server sends into reply lines."""
    return LineFramer(max_length=MAX_REPLY)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(command: str, args: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"v": VERSION, "command": command}
    if args:
        message["args"] = args
    return encode(message)


def reply_ok(result: Any = None) -> bytes:
    return encode({"v": VERSION, "ok": True, "result": result})


def reply_error(error: str) -> bytes:
    return encode({"v": VERSION, "ok": False, "error": error})


def parse_request(line: bytes | memoryview, uid: int | None = None) -> Request:
    """The request a line carries, or ProtocolError saying what is wrong with it."""
    message = _parse_object(line)
    version = message.get("v")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {_short(version)} "
                            "(this server speaks 1)")
    name = message.get("command")
    if not isinstance(name, str):
        raise ProtocolError("request has no 'command' string")
    command = COMMANDS.get(name)
    if command is None:
        raise ProtocolError(f"unknown command {_short(name)} (known: {', '.join(COMMANDS)})")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be a JSON object")
    for key, value in args.items():
        spec = command.arguments.get(key)
        if spec is None:
            raise ProtocolError(f"{name} takes no argument {_short(key)}")
        _check(name, key, value, spec)
    for key, spec in command.arguments.items():
        if spec.required and key not in args:
            raise ProtocolError(f"{name} needs the argument {key!r}")
    return Request(name, args, uid)


def _check(name: str, key: str, value: Any, spec: Argument) -> None:
    if spec.kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{name}: {key} must be a whole number")
        if not spec.low <= value <= spec.high:
            raise ProtocolError(f"{name}: {key} must be between {spec.low} and {spec.high}")
    elif not isinstance(value, str) or len(value) > 256:
        raise ProtocolError(f"{name}: {key} must be a string of at most 256 characters")
    elif spec.choices and value not in spec.choices:
        raise ProtocolError(f"{name}: {key} must be one of {', '.join(spec.choices)}")


def parse_reply(line: bytes | memoryview) -> Any:
    """The result of a reply line; ProtocolError carries the server's error text."""
    message = _parse_object(line)
    if message.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {_short(message.get('v'))}")
    if message.get("ok") is True:
        return message.get("result")
    raise ProtocolError(str(message.get("error", "malformed reply")))


def _parse_object(line: bytes | memoryview) -> dict[str, Any]:
    try:
        message = json.loads(bytes(line))
    except RecursionError:
        raise ProtocolError("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
        raise ProtocolError(f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def _short(value: Any) -> str:
    """``repr`` of a peer's value, cut short: an error reply never echoes a megabyte back."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
