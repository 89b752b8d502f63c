"""The argument parser every ``portside`` command uses: bad input is one line, never a usage
dump or a traceback, and a flag counts only when written in full, with the closest flag
suggested for a typo. Light on purpose: ``portside ctl`` imports it on its fast path."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit status 2, never a usage dump or a traceback.

    A flag is taken only when written in full (``--worker 2`` is not ``--workers 2``: a prefix
    that matches today may match two flags tomorrow), and a mistyped one is answered with the
    closest flag this command has, as git and cargo do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        """As argparse's, but an unknown flag is an error here, in the (sub)command that knows
        which flags it has, so that the error can name the closest."""
        parsed, extras = super().parse_known_args(args, namespace)
        flags = [arg for arg in extras if arg.startswith("-") and arg != "-"
                 and not self._negative_number_matcher.match(arg)]
        if flags:
            self.error(f"unrecognized arguments: {' '.join(extras)}"
                       f"{suggestion(flags[0], self._option_string_actions)}")
        assert parsed is not None
        return parsed, extras


def suggestion(flag: str, known: Iterable[str]) -> str:
    """`` (did you mean --workers?)`` for ``--worker``, or nothing when no flag is close."""
    import difflib

    close = difflib.get_close_matches(flag.partition("=")[0], list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
