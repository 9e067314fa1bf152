"""Two machines, client side: talk to two_machines_server.py over TLS with an authkey.

See two_machines_server.py for making the certificates and starting the server. Then::

    export HYPERPIPE_AUTHKEY=<the server's value>
    python examples/two_machines_client.py --host machine-a --port 6000 --tls-dir ./tls

``--tls-dir`` holds ca.pem (to check the server), client.pem and client.key (to prove
who we are: the server requires a client certificate). Leave it out to use plain TCP
with the authkey only, against a server started without ``--tls-dir``.
"""

from __future__ import annotations

import argparse
import os
import ssl
from pathlib import Path
from typing import Optional

import hyperpipe


def client_context(tls_dir: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_dir / "ca.pem"))
    context.load_cert_chain(tls_dir / "client.pem", tls_dir / "client.key")
    return context


def run(host: str, port: int, tls_dir: Optional[Path]) -> None:
    authkey = os.environ["HYPERPIPE_AUTHKEY"].encode()
    context = client_context(tls_dir) if tls_dir else None
    with hyperpipe.Client(
        (host, port), authkey=authkey, ssl_context=context, codec="json", timeout=30
    ) as conn:
        for args in ([1, 2], [10, 20, 30], [0.5, 0.25]):
            conn.send({"op": "add", "args": args})
            print(f"add{tuple(args)} = {conn.recv(timeout=30)['result']}", flush=True)
        conn.send("bye")
        print(conn.recv(timeout=30), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6000)
    parser.add_argument("--tls-dir", type=Path, help="directory with ca.pem, client.pem, client.key")
    args = parser.parse_args()
    run(args.host, args.port, args.tls_dir)


if __name__ == "__main__":
    main()
