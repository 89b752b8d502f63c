"""Log lines an operator can live with: every line says which process wrote it (pid, and
supervisor or worker N), as text or as one JSON object per line; process titles say the same."""

from __future__ import annotations

import json
import logging
import sys
import time

from portside.config import LogFormat, LogLevel
from portside.text import printable

TEXT_FORMAT = "%(asctime)s [%(process)d%(role)s] %(levelname)s %(name)s: %(message)s"


class _Role(logging.Filter):
    """Stamps every record with this process's role (" supervisor", " worker 2", or "")."""

    def __init__(self) -> None:
        super().__init__()
        self.role = ""
        self.worker: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.worker = self.worker
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, one record one line: the message is escaped (``text.printable``), so a
    peer's text inside it can neither forge a line nor reach the terminal (a traceback, added
    after the message, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, worker, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}" + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "worker": getattr(record, "worker", None),
            "message": printable(record.getMessage()),  # JSON leaves C1 and DEL raw
        }
        if getattr(record, "role", "") == " supervisor":
            document["role"] = "supervisor"
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


_role = _Role()


def configure(level: LogLevel, log_format: LogFormat) -> None:
    """Send portside's log to stderr in ``log_format`` at ``level`` (again: reconfigures)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "portside", False):
            root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.portside = True  # type: ignore[attr-defined]
    handler.addFilter(_role)
    handler.setFormatter(JsonFormatter() if log_format is LogFormat.JSON
                         else TextFormatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.value.upper()))


def set_role(role: str, worker: int | None = None) -> None:
    """Name this process in every log line and in its process title (``ps``, ``top``)."""
    _role.role = f" {role}" if role else ""
    _role.worker = worker
    set_title(f"portside: {role}" if role else "portside")


def set_title(title: str) -> None:
    """The process title, with the optional ``setproctitle`` package; else left as is."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(f"{title} ({' '.join(sys.argv[1:])[:200]})"
                              if sys.argv[1:] else title)
