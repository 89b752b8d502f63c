"""systemd's notify protocol, spoken directly (no dependency): datagrams to $NOTIFY_SOCKET.

READY=1 once serving, RELOADING=1 / READY=1 around a reload, STOPPING=1 at shutdown, MAINPID
when an upgraded supervisor takes over, and WATCHDOG=1 every half WATCHDOG_USEC while the loop
runs (when systemd asks for it with WatchdogSec=). Outside systemd every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger("portside.systemd")


def notify(*fields: str) -> bool:
    """Send ``fields`` ("READY=1", ...) to systemd; False when not run under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", address, exc)
        return False
    return True


def reloading() -> None:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's WatchdogSec), or None when off."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0 or not os.environ.get("NOTIFY_SOCKET"):
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000
