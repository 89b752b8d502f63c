"""An earlier commit's source tree, for measuring portside against its own past in one run.

``python -m bench --baseline REV`` unpacks ``git archive REV`` under ``bench/build/`` once and
adds ``portside_epoll@REV`` (the pure-Python engine as it was) to the servers measured, so
"no slower than before" is a side-by-side ratio, not a comparison across runs and days.
"""

from __future__ import annotations

import subprocess
import tarfile
from io import BytesIO
from pathlib import Path

from bench.servers import SERVERS, baseline

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "bench" / "build"
GIT_TIMEOUT = 60.0


class BaselineError(RuntimeError):
    """The revision is unknown to git, or its tree could not be unpacked."""


def _git(*args: str) -> bytes:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True,
                              timeout=GIT_TIMEOUT).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BaselineError(f"git {' '.join(args)} failed: {exc}") from None


def add(revision: str, engine: str = "epoll", build: Path = BUILD) -> str:
    """Register the baseline server for ``revision`` and return its name."""
    short = _git("rev-parse", "--short", "--verify", f"{revision}^{{commit}}").decode().strip()
    tree = build / f"tree-{short}"
    if not (tree / "bench" / "servers" / "portside_echo.py").exists():
        unpacking = tree.with_name(tree.name + ".partial")
        archive = _git("archive", "--format=tar", short)
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(unpacking, filter="data")
        unpacking.rename(tree)  # whole or not at all: a half-unpacked tree is never used
    spec = baseline(engine, short, tree)
    SERVERS[spec.name] = spec
    return spec.name
