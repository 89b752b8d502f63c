"""``python -m portside`` (and the ``portside`` script) is the ``portside`` command.

``ctl`` and ``top`` go straight to ``control.command``: scripts and probes call them often, so
they skip what the server commands need (the settings, the handler loading, their flags)."""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] in (["ctl"], ["top"]):
        from portside.control.command import main as control

        return control(argv)
    from portside.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
