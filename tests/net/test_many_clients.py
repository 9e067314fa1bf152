"""One Listener serving many concurrent clients, every reply checked."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any, Callable

import pytest

from hyperpipe import Client, Listener

from net_support import STEP_TIMEOUT

KEY = b"many clients"


def _client(address: Any, client_id: int, rounds: int, errors: list, authkey: Any = KEY) -> None:
    try:
        with Client(address, authkey=authkey, timeout=STEP_TIMEOUT) as conn:
            for i in range(rounds):
                conn.send((client_id, i))
                reply = conn.recv(timeout=STEP_TIMEOUT)
                if reply != (client_id, i):
                    errors.append(f"client {client_id} round {i}: got {reply!r}")
                    return
            conn.send(b"x" * 100_000)
            reply = conn.recv(timeout=STEP_TIMEOUT)
            if reply != b"x" * 100_000:
                errors.append(f"client {client_id}: big reply corrupted")
    except BaseException as exc:
        errors.append(f"client {client_id}: {exc!r}")


def run_clients(address: Any, clients: int, rounds: int) -> list:
    errors: list = []
    threads = [
        threading.Thread(target=_client, args=(address, n, rounds, errors), daemon=True)
        for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(t.is_alive() for t in threads), "client threads hung"
    return errors


@pytest.mark.parametrize(
    "family_name", ["AF_INET", pytest.param("AF_UNIX", marks=pytest.mark.stress)]
)
def test_100_threads_1000_round_trips_each(family_name: str, address_for: Callable, echo_server: Any) -> None:
    with Listener(address_for(family_name), backlog=128, authkey=KEY) as listener:
        server = echo_server(listener)
        errors = run_clients(listener.address, clients=100, rounds=1000)
        assert errors == []
        assert server.accept_errors == []
        assert server.connection_errors == []


def _process_client(address: Any, first_id: int, clients: int, rounds: int, queue: Any) -> None:
    errors: list = []
    threads = [
        threading.Thread(target=_client, args=(address, first_id + n, rounds, errors), daemon=True)
        for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    queue.put(errors + [f"hung threads in {first_id}"] * sum(t.is_alive() for t in threads))


@pytest.mark.stress
def test_100_processes_10000_round_trips_each(address_for: Callable, echo_server: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with Listener(address_for("AF_INET"), backlog=128, authkey=KEY) as listener:
        server = echo_server(listener)
        procs = [
            ctx.Process(target=_process_client, args=(listener.address, n, 1, 10_000, queue), daemon=True)
            for n in range(100)
        ]
        for proc in procs:
            proc.start()
        try:
            results = [queue.get(timeout=1800) for _ in procs]
        finally:
            for proc in procs:
                proc.join(60)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        assert [e for r in results for e in r] == []
        assert server.accept_errors == []
        assert server.connection_errors == []
