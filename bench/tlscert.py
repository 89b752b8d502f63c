"""A throwaway self-signed certificate for the TLS scenarios, made afresh for every run.

The ``openssl`` command writes an ECDSA P-256 key and a certificate for 127.0.0.1 (valid two
days) under bench/build/tls/<stamp>/; every TLS server of the run gets the same pair, so the
key type, and with it the cost of a handshake's signature, is the same for all.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.build import BUILD_DIR, BuildError

CURVE = "prime256v1"  # ECDSA P-256: what most TLS deployments sign handshakes with today


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def server_args(self) -> tuple[str, ...]:
        """The options every TLS benchmark server takes."""
        return ("--certfile", str(self.cert), "--keyfile", str(self.key))


def make(stamp: str, build_dir: Path = BUILD_DIR) -> TlsFiles:
    """A fresh key and self-signed certificate for this run; a missing ``openssl`` command
    or a failure of it is a ``BuildError`` saying so in one line."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BuildError("the TLS scenarios need the openssl command (apt-get install openssl)")
    directory = build_dir / "tls" / stamp
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    argv = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", f"ec_paramgen_curve:{CURVE}",
            "-nodes", "-keyout", str(files.key), "-out", str(files.cert), "-days", "2",
            "-subj", "/CN=portside-bench", "-addext", "subjectAltName=IP:127.0.0.1"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"openssl req failed: {exc}") from None
    if done.returncode != 0:
        raise BuildError(f"openssl req failed: {done.stderr.strip()[-300:]}")
    return files
