"""Two machines, server side: an authenticated, TLS-encrypted hyperpipe Listener.

Run the server on machine A, then the client (two_machines_client.py) on machine B::

    # once, on A: a private CA, a certificate for A and one for the client
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \\
        -keyout ca.key -out ca.pem -days 365 -subj /CN=hyperpipe-ca
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \\
        -keyout server.key -out server.csr -subj /CN=machine-a
    printf 'subjectAltName=DNS:machine-a,IP:192.0.2.10\\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \\
        -out server.pem -days 365 -extfile server.ext
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \\
        -keyout client.key -out client.csr -subj /CN=machine-b
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \\
        -out client.pem -days 365
    # copy ca.pem, client.pem and client.key to machine B; keep ca.key offline

    # on A (the shared secret must be the same on both sides):
    export HYPERPIPE_AUTHKEY=$(python -c 'import secrets; print(secrets.token_hex(32))')
    python examples/two_machines_server.py --host 0.0.0.0 --port 6000

    # on B:
    export HYPERPIPE_AUTHKEY=<the same value>
    python examples/two_machines_client.py --host machine-a --port 6000

To try both sides on one machine, use ``--host 127.0.0.1`` for the server, make the server
certificate with ``IP:127.0.0.1`` and run the client with ``--host 127.0.0.1``. Without
``--tls-dir`` both sides fall back to plain TCP with the authkey only (no encryption).

The server answers ``{"op": "add", "args": [...]}`` requests with their sum. It uses the
JSON codec: whatever a peer sends, loading it can never run code.
"""

from __future__ import annotations

import argparse
import os
import ssl
import threading
from pathlib import Path
from typing import Any, Optional

import hyperpipe


def server_context(tls_dir: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_dir / "server.pem", tls_dir / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: clients need a certificate
    context.load_verify_locations(tls_dir / "ca.pem")
    return context


def handle(conn: Any) -> None:
    with conn:
        while True:
            try:
                request = conn.recv(timeout=300)
            except (EOFError, hyperpipe.TimeoutError):
                return
            except ValueError as exc:  # not JSON: tell the peer, keep the connection
                conn.send({"error": f"bad request: {exc}"})
                continue
            if isinstance(request, dict) and request.get("op") == "add":
                conn.send({"result": sum(request.get("args", []))})
            elif request == "bye":
                conn.send("bye")
                return
            else:
                conn.send({"error": "unknown request"})


def serve(host: str, port: int, tls_dir: Optional[Path], max_clients: Optional[int]) -> None:
    authkey = os.environ["HYPERPIPE_AUTHKEY"].encode()
    context = server_context(tls_dir) if tls_dir else None
    with hyperpipe.Listener(
        (host, port),
        backlog=64,
        authkey=authkey,
        ssl_context=context,
        codec="json",
        max_message_size=1 << 20,
        handshake_timeout=10,
    ) as listener:
        print(f"listening on {listener.address} (TLS: {context is not None})", flush=True)
        served = 0
        workers = []
        while max_clients is None or served < max_clients:
            try:
                conn = listener.accept()
            except hyperpipe.AuthenticationError as exc:
                print(f"refused a client: {exc}", flush=True)
                continue
            served += 1
            print(f"client from {listener.last_accepted}", flush=True)
            worker = threading.Thread(target=handle, args=(conn,), daemon=True)
            worker.start()
            workers.append(worker)
        for worker in workers:
            worker.join(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6000)
    parser.add_argument("--tls-dir", type=Path, help="directory with ca.pem, server.pem, server.key")
    parser.add_argument("--max-clients", type=int, help="exit after serving this many clients")
    args = parser.parse_args()
    serve(args.host, args.port, args.tls_dir, args.max_clients)


if __name__ == "__main__":
    main()
