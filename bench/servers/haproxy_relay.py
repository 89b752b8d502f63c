"""HAProxy in TCP mode (``mode tcp``) as a benchmark server: the relay portside's is compared
with, forwarding every client to ``--upstream``.

The listening socket is bound here and handed to HAProxy (``bind fd@N``), so it is listening
before HAProxy starts; this process then prints the port and becomes HAProxy (exec), so the
pid the harness measures and stops is HAProxy's own. One thread (``nbthread 1``), as portside's
relay runs one loop; SIGTERM stops it. With ``--certfile``/``--keyfile`` it terminates TLS
(``ssl crt`` on the bind line, certificate and key in one PEM file as HAProxy takes them).
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import sys
from pathlib import Path

from bench.build import BUILD_DIR
from bench.servers.common import BACKLOG, HOST, announce, parser


def config(fd: int, upstream: str, max_seconds: float, maxconn: int,
           crt: Path | None = None) -> str:
    tls = f" ssl crt {crt}" if crt is not None else ""
    return f"""# written by bench/servers/haproxy_relay.py for one benchmark session
global
    maxconn {maxconn}
    nbthread 1
    hard-stop-after {int(max_seconds)}s
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend relay
    bind fd@{fd}{tls}
    default_backend upstream
backend upstream
    server echo {upstream}
"""


def main() -> None:
    cli = parser(__doc__ or "")
    cli.add_argument("--upstream", required=True, help="HOST:PORT of the server relayed to")
    args = cli.parse_args()
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        sys.exit("haproxy_relay: haproxy is not installed (scripts/test installs it)")
    front = socket.socket()
    front.bind((HOST, args.port))
    front.listen(BACKLOG)
    front.set_inheritable(True)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    path = BUILD_DIR / "haproxy-relay.cfg"  # one session at a time: rewritten each time
    crt: Path | None = None
    if args.certfile or args.keyfile:
        if not (args.certfile and args.keyfile):
            sys.exit("haproxy_relay: --certfile and --keyfile go together")
        crt = BUILD_DIR / "haproxy-relay.pem"
        crt.write_bytes(Path(args.certfile).read_bytes() + Path(args.keyfile).read_bytes())
    # Two descriptors per relayed client, within the limit the harness set (HAProxy refuses
    # to start on a maxconn it cannot open descriptors for).
    maxconn = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 - 64)
    path.write_text(config(front.fileno(), args.upstream, args.max_seconds, maxconn, crt))
    announce(front.getsockname()[1])
    os.execv(haproxy, [haproxy, "-f", str(path), "-db"])


if __name__ == "__main__":
    main()
