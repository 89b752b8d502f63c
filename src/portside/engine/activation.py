"""systemd socket activation: listening sockets handed over in LISTEN_FDS.

systemd (or anything speaking its protocol) opens the listening sockets itself, starts the
service with them as descriptors 3, 4, ... and sets LISTEN_PID (the service's pid: the sockets
are for it, not for a child that inherited the environment), LISTEN_FDS (how many) and
optionally LISTEN_FDNAMES (colon-separated names from the ``.socket`` units).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from portside.errors import ConfigError

SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class ActivatedSocket:
    sock: socket.socket
    name: str


def activated_sockets(environ: dict[str, str] | None = None) -> list[ActivatedSocket]:
    """The sockets systemd passed to this process (none when not socket-activated).

    The variables are removed from ``os.environ`` so that worker processes and anything else
    started later do not take the sockets as theirs.
    """
    env = os.environ if environ is None else environ
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
    found = []
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError(f"LISTEN_FDS descriptor {fd} is not a socket: {exc}") from None
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"LISTEN_FDS descriptor {fd} is not a stream socket")
        os.set_inheritable(fd, True)  # workers inherit it, like a socket the supervisor bound
        found.append(ActivatedSocket(sock, labels[index] if index < len(labels) else ""))
    return found
