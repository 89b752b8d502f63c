"""``python -m portside`` (and the ``portside`` script) is the ``portside`` command.

``ctl`` and ``top`` go straight to ``control.command``: scripts and probes call them often, so
they skip what the server commands need (the settings, the handler loading, their flags).
Output to a reader that has gone (``portside ctl ... | head``) ends any command quietly, as
SIGPIPE ends ``cat``: no traceback, status 141. (SIGPIPE itself stays ignored: a server must
survive a peer that has gone.)"""

from __future__ import annotations

import os
import sys

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what the shell reports for a command SIGPIPE ended


def main() -> int:
    try:
        status = _command(sys.argv[1:])
        sys.stdout.flush()  # here, not at exit, where a failure could only be a traceback
        return status
    except BrokenPipeError:
        # Python's advice (the signal module's docs): point stdout at /dev/null, so that the
        # interpreter's last flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _command(argv: list[str]) -> int:
    if argv[:1] in (["ctl"], ["top"]):
        from portside.control.command import main as control

        return control(argv)
    from portside.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
