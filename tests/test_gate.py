"""`--gate URL`: one POST, 2xx in time lets the canary go on, anything else stops it (against a
stdlib HTTP server on loopback)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from registrar.adapters.gate import INTERRUPTED, ask_gate
from tests.support.proc import free_port

PAYLOAD: dict[str, object] = {"service": "web", "version": "v2", "step": 0, "percent": 0,
                              "requests": 0, "error_rate": None, "p99_ms": None}


class Gate:
    def __init__(self) -> None:
        self.status = 204
        self.delay = 0.0
        self.location = ""
        self.bodies: list[object] = []
        gate = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                gate.bodies.append((self.headers.get("Content-Type"),
                                    json.loads(self.rfile.read(length))))
                time.sleep(gate.delay)
                self.send_response(gate.status)
                if gate.location:
                    self.send_header("Location", gate.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/gate"
        # a short poll: shutdown() returns at its next look (the default 0.5 s per test)
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()


@pytest.fixture
def gate() -> Iterator[Gate]:
    served = Gate()
    yield served
    served.server.shutdown()
    served.server.server_close()


def never(seconds: float) -> bool:
    """Never stopped; returns early (it may: "at most that long"), so an answer is seen at
    once rather than at the end of ask_gate's slice."""
    time.sleep(min(seconds, 0.005))
    return False


@pytest.mark.parametrize("status", [200, 202, 204, 299])
def test_a_2xx_lets_it_go_on_and_the_payload_is_json(gate: Gate, status: int) -> None:
    gate.status = status
    assert ask_gate(gate.url, PAYLOAD, never) is None
    assert gate.bodies == [("application/json", PAYLOAD)]


@pytest.mark.parametrize("status", [100 + 99, 301, 302, 400, 404, 500, 503])
def test_anything_else_stops_it_naming_the_gate(gate: Gate, status: int) -> None:
    gate.status = status
    gate.location = gate.url.replace("/gate", "/elsewhere") if 300 <= status < 400 else ""
    assert ask_gate(gate.url, PAYLOAD, never) == f"gate {gate.url} answered HTTP {status}"


def test_no_answer_in_time_stops_it(gate: Gate) -> None:
    gate.delay = 2.0
    started = time.monotonic()
    assert ask_gate(gate.url, PAYLOAD, never, timeout=0.2) == (
        f"gate {gate.url} did not answer within 0.2s")
    assert time.monotonic() - started < 1.0


def test_no_server_stops_it() -> None:
    url = f"http://127.0.0.1:{free_port()}/gate"
    why = ask_gate(url, PAYLOAD, never)
    assert why is not None and why.startswith(f"gate {url} could not be reached: ")


def test_a_signal_while_waiting_returns_at_once(gate: Gate) -> None:
    gate.delay = 2.0
    told = threading.Event()
    threading.Timer(0.1, told.set).start()
    started = time.monotonic()
    assert ask_gate(gate.url, PAYLOAD, told.wait) == INTERRUPTED
    assert time.monotonic() - started < 1.0
