"""Compiles the harness's C programs with the machine's gcc into bench/build/ (not committed)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

BUILD_DIR = Path(__file__).resolve().parent / "build"
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")


class BuildError(RuntimeError):
    """The compiler is missing or rejected a source file."""


def compiler() -> str:
    for name in (os.environ.get("CC", ""), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C compiler found (install gcc, or set CC)")


def compiler_version() -> str:
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (BuildError, OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def build(source: Path, build_dir: Path = BUILD_DIR, libs: tuple[str, ...] = ()) -> Path:
    """The binary for ``source``, compiled unless an up-to-date one exists (keyed by a hash),
    linked with ``libs`` (``-lssl`` ...)."""
    cc = compiler()
    text = source.read_bytes()
    key = hashlib.sha256(text + " ".join((cc, *CFLAGS, *libs)).encode()).hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    binary = build_dir / f"{source.stem}-{key}"
    if binary.exists():
        return binary
    partial = binary.with_name(binary.name + ".tmp")
    result = subprocess.run([cc, *CFLAGS, "-o", str(partial), str(source), *libs],
                            capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        hint = ("\n(the TLS load generator needs OpenSSL's headers: apt-get install libssl-dev)"
                if "-lssl" in libs and "openssl/" in result.stderr else "")
        raise BuildError(f"{cc} failed on {source.name}:\n{result.stderr.strip()}{hint}")
    partial.replace(binary)
    return binary
