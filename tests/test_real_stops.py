"""SIGTERM at random moments, with etcd refusing or cut: every stop happens in time.

A stop that does not happen is the worst way to lose a deregistration. Once, in CI, an agent
slept through SIGTERM (etcd refusing the TLS handshake, the main thread waiting on a lock with
no timeout, the signal given to another thread): see registrar/shutdown.py. Each scenario here
starts a process, waits until it handles SIGTERM (its SigCgt mask in /proc says so), sends the
signal after a random delay, and requires exit 0 within the shutdown deadline (everything before
the drain within 5 s of the signal; a little margin for a loaded machine).

REGISTRAR_STOP_ROUNDS sets the rounds per scenario: 10 in the suite, 50 in `make stress-stops`.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.etcd import EtcdServer
from tests.support.proc import RegistrarProcess, wait_until
from tests.support.tls import client_context, etcd_tls_args
from tests.test_real_security import Pki, start_etcd

pytestmark = [pytest.mark.real, pytest.mark.slow]

ROUNDS = int(os.environ.get("REGISTRAR_STOP_ROUNDS", "10"))
EXIT_WITHIN = 6.0  # the 5 s deadline, and a margin for a loaded 2-core machine
LATEST_SIGNAL = 1.5  # the random delay after the handler is installed: 0 .. this
NO_METRICS = ["--metrics-addr", "127.0.0.1:0"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_etcd(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd that requires a client certificate: the agents here give none, so every
    handshake is refused."""
    server = start_etcd(
        tmp_path_factory.mktemp("etcd-tls"), "rgt-stops", scheme="https",
        ssl_context=client_context(pki.ca, pki.client),
        extra_args=etcd_tls_args(pki.ca, pki.server),
    )
    yield server
    server.destroy()


def handles_sigterm(pid: int) -> bool:
    """Whether the process has installed a handler for SIGTERM (its SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def stop_at_random(proc: RegistrarProcess, rng: random.Random) -> float:
    """SIGTERM at a random moment after the handler is in place; seconds until it exited."""
    wait_until(lambda: handles_sigterm(proc.pid) or not proc.alive, timeout=20,
               message=proc.logs)
    assert proc.alive, proc.logs()
    time.sleep(rng.uniform(0, LATEST_SIGNAL))
    sent = time.monotonic()
    proc.terminate()
    code = proc.wait(EXIT_WITHIN + 10)
    took = time.monotonic() - sent
    assert code == 0, proc.logs()
    assert took <= EXIT_WITHIN, f"exit {took:.2f}s after SIGTERM\n{proc.logs()}"
    assert "received SIGTERM" in proc.logs()
    assert "Traceback" not in proc.logs()
    return took


def rounds(start: Any, unique: str) -> list[float]:
    rng = random.Random(unique)
    took = []
    for n in range(ROUNDS):
        proc = start(n)
        try:
            took.append(stop_at_random(proc, rng))
        finally:
            proc.kill()
    return took


def test_agent_stops_in_time_while_etcd_refuses_tls(
    pki: Pki, tls_etcd: EtcdServer, registrar: Any, unique: str
) -> None:
    took = rounds(lambda n: registrar(
        "watch", "--etcd", tls_etcd.url, *pki.flags(None), "--node", f"node-{unique}-{n}",
        "--prefix", f"/rgt-{unique}", *NO_METRICS), unique)
    assert len(took) == ROUNDS


def test_agent_stops_in_time_while_etcd_is_cut(
    etcd: EtcdServer, forwarders: Any, registrar: Any, unique: str
) -> None:
    fwd = forwarders.etcd(etcd)
    fwd.cut()
    took = rounds(lambda n: registrar(
        "watch", "--etcd", fwd.url, "--node", f"node-{unique}-{n}", "--prefix",
        f"/rgt-{unique}", *NO_METRICS), unique)
    assert len(took) == ROUNDS


def test_sidecar_waiting_for_its_container_stops_in_time(
    etcd: EtcdServer, registrar: Any, unique: str
) -> None:
    took = rounds(lambda n: registrar(
        "register", f"rgt-absent-{unique}-{n}", "--wait", "60", "--etcd", etcd.url,
        "--node", f"node-{unique}", "--prefix", f"/rgt-{unique}"), unique)
    assert len(took) == ROUNDS
