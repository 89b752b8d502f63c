"""Listening sockets handed over by systemd (LISTEN_FDS) or by the supervisor being upgraded
(PORTSIDE_LISTEN_FDS).

systemd (or anything speaking its protocol) opens the listening sockets itself, starts the
service with them as descriptors 3, 4, ... and sets LISTEN_PID (the service's pid: the sockets
are for it, not for a child that inherited the environment), LISTEN_FDS (how many) and
optionally LISTEN_FDNAMES (colon-separated names from the ``.socket`` units). An upgrade (USR2)
passes the old supervisor's sockets at their own descriptor numbers, listed with their names
as ``PORTSIDE_LISTEN_FDS=5:data-first,6:immediate``.

Sockets made elsewhere lack the options portside sets when it binds; ``apply_listener_options``
sets the one that matters on an inherited socket (TCP_DEFER_ACCEPT on data-first listeners).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from portside.errors import ConfigError

if TYPE_CHECKING:
    from portside.config import ListenerConfig

SD_LISTEN_FDS_START = 3
INHERIT_ENV = "PORTSIDE_LISTEN_FDS"


@dataclass(frozen=True)
class ActivatedSocket:
    sock: socket.socket
    name: str


def activated_sockets(environ: dict[str, str] | None = None) -> list[ActivatedSocket]:
    """The sockets handed to this process (none when it was started the ordinary way).

    The variables are removed from ``os.environ`` so that worker processes and anything else
    started later do not take the sockets as theirs.
    """
    env = os.environ if environ is None else environ
    inherited = env.pop(INHERIT_ENV, None)
    if inherited is not None:
        return _inherited(inherited)
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or count is None:
        return []
    names = env.get("LISTEN_FDNAMES", "")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(variable, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"LISTEN_FDS={count!r} is not a positive number of sockets")
    labels = names.split(":") if names else []
    return [_adopt(SD_LISTEN_FDS_START + index, labels[index] if index < len(labels) else "",
                   "LISTEN_FDS") for index in range(int(count))]


def _inherited(text: str) -> list[ActivatedSocket]:
    found = []
    for entry in filter(None, text.split(",")):
        fd_text, _, name = entry.partition(":")
        if not fd_text.isdigit():
            raise ConfigError(f"{INHERIT_ENV}: {entry!r} is not a descriptor number")
        found.append(_adopt(int(fd_text), name, INHERIT_ENV))
    return found


def _adopt(fd: int, name: str, source: str) -> ActivatedSocket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"{source} descriptor {fd} is not a socket: {exc}") from None
    if sock.type != socket.SOCK_STREAM:
        raise ConfigError(f"{source} descriptor {fd} is not a stream socket")
    os.set_inheritable(fd, True)  # workers inherit it, like a socket the supervisor bound
    return ActivatedSocket(sock, name)


def apply_listener_options(sock: socket.socket, config: ListenerConfig) -> None:
    """Set on a socket made elsewhere what ``bind_listener`` sets on its own: TCP_DEFER_ACCEPT
    on a data-first TCP listener (systemd's ``DeferAcceptSec=`` does the same)."""
    from portside.config import AcceptPolicy

    if config.policy is AcceptPolicy.DATA_FIRST and config.defer_accept and \
            sock.family in (socket.AF_INET, socket.AF_INET6) and \
            hasattr(socket, "TCP_DEFER_ACCEPT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, config.defer_accept)
