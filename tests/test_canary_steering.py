"""`promote SERVICE --pause|--resume|--abort` and the canary command that acts on them, against
the fake etcd (the real tier does the same with real routers: tests/test_real_canary.py)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import cast

import pytest

from registrar.adapters.etcd_store import EtcdStore
from registrar.commands.canary import CanaryCommand
from registrar.commands.promote import Rotation
from registrar.commands.steer import run_steering
from registrar.core.store import StoredKey
from registrar.errors import FatalError
from registrar.settings import Settings, parse_settings
from tests.fakes import FakeEtcd

CTL = "/ctl"
WEIGHTS = f"{CTL}/weights/web"
OWNER = f"{CTL}/canary/web/owner"


class Store(FakeEtcd):
    """With the two writes the canary commands make besides the agents': puts without a
    lease (weights, requests) and put_if_absent."""

    def put(self, key: str, value: str, lease: int = 0) -> None:
        if lease:
            super().put(key, value, lease)
            return
        with self.lock:
            self._check()
            self.kv[key] = StoredKey(value, 0)
            self.ops.append(("put", key))

    def put_if_absent(self, key: str, value: str) -> bool:
        with self.lock:
            if key in self.kv:
                return False
        self.put(key, value)
        return True


def settings(*argv: str) -> Settings:
    return parse_settings(["promote", "web", *argv, "--prefix", "/s", "--control-prefix", CTL,
                           "--timeout", "5"], {}, "host")


def steer(store: Store, action: str) -> tuple[int, str]:
    out = io.StringIO()
    code = run_steering(cast(EtcdStore, store), settings(f"--{action}"), out)
    return code, out.getvalue()


def weights(paused: bool = False) -> StoredKey:
    value: dict[str, object] = {"version": "v2", "percent": 10, "at": "2026-01-01T00:00:00Z"}
    if paused:
        value["paused"] = True
    return StoredKey(json.dumps(value), 0)


def test_nothing_in_progress_is_an_error() -> None:
    with pytest.raises(FatalError, match="no canary of web in progress"):
        steer(Store(), "pause")


def test_abort_of_a_weights_key_nobody_follows_deletes_it() -> None:
    store = Store({WEIGHTS: weights()})
    code, said = steer(store, "abort")
    assert code == 0 and "no canary command follows" in said and "deleted it" in said
    assert WEIGHTS not in store.kv


def test_pause_of_a_weights_key_nobody_follows_is_an_error_and_changes_nothing() -> None:
    store = Store({WEIGHTS: weights()})
    with pytest.raises(FatalError, match="`registrar promote web --abort` deletes it"):
        steer(store, "pause")
    assert WEIGHTS in store.kv and not store.ops


def test_nothing_to_do_says_so() -> None:
    store = Store({WEIGHTS: weights(paused=True)})
    lease = store.grant(3)
    store.put(OWNER, "{}", lease)
    assert steer(store, "pause") == (0, "canary of web v2 is paused already at 10%; nothing"
                                        " to do\n")
    store.put(WEIGHTS, weights().value)
    assert steer(store, "resume") == (0, "canary of web v2 is not paused (at 10%); nothing"
                                         " to do\n")


def test_a_request_nobody_acknowledges_is_withdrawn_and_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from registrar.commands import steer as steer_module

    monkeypatch.setattr(steer_module, "ACK_WITHIN", 0.4)  # 2 s in earnest
    store = Store({WEIGHTS: weights()})
    store.put(OWNER, "{}", store.grant(3))
    started = time.monotonic()
    with pytest.raises(FatalError, match=r"did not acknowledge --pause within 0\.4s"):
        steer(store, "pause")
    assert 0.4 <= time.monotonic() - started < 1.9
    assert f"{CTL}/canary/web/request" not in store.kv


@pytest.fixture
def canary(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Store, Callable[[], int]]]:
    from registrar.commands import canary as canary_module

    # requests looked at every 0.1 s and signals every 0.05 s (0.5 s and 0.2 s in earnest)
    monkeypatch.setattr(canary_module, "STEER_EVERY", 0.1)
    monkeypatch.setattr(canary_module, "SLICE", 0.05)
    store = Store()
    out = io.StringIO()
    command = CanaryCommand(cast(EtcdStore, store),
                            settings("v2", "--canary", "10", "--interval", "0.3",
                                     "--timeout", "60",
                                     "--min-requests", "1000"), out)

    def run() -> int:
        return command.run(Rotation({}, {}))

    yield store, run


def in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def wrapped() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test's main thread, which fails with it
            errors.append(exc)

    thread = threading.Thread(target=wrapped, daemon=True)
    thread.start()
    return thread, errors


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.02)


def test_pause_resume_abort_are_acknowledged_by_the_running_canary(
        canary: tuple[Store, Callable[[], int]]) -> None:
    store, run = canary
    said: list[tuple[int, str]] = []

    def operator() -> None:
        wait_for(lambda: WEIGHTS in store.kv)
        said.append(steer(store, "pause"))
        assert json.loads(store.kv[WEIGHTS].value).get("paused") is True
        time.sleep(0.5)  # past the 0.3 s interval: held, not judged, no deadline
        said.append(steer(store, "resume"))
        assert "paused" not in json.loads(store.kv[WEIGHTS].value)
        said.append(steer(store, "abort"))

    thread, errors = in_thread(operator)
    with pytest.raises(FatalError) as ended:
        run()  # the main thread: it installs the signal handlers
    thread.join(5)
    assert not errors, errors
    assert str(ended.value).startswith("canary of web v2 aborted at 10% after ")
    assert [code for code, _ in said] == [0, 0, 0]
    assert said[0][1].startswith("canary of web v2 paused: paused at 10% (acknowledged in 0.")
    assert said[1][1].startswith("canary of web v2 resumed: running at 10% (acknowledged in ")
    assert said[2][1].startswith("canary of web v2 aborted: rolled back (acknowledged in ")
    assert WEIGHTS not in store.kv and OWNER not in store.kv  # rolled back, lease revoked
    assert f"{CTL}/canary/web/request" not in store.kv


def test_a_weights_key_deleted_from_outside_rolls_the_canary_back(
        canary: tuple[Store, Callable[[], int]]) -> None:
    store, run = canary
    def operator() -> None:
        wait_for(lambda: WEIGHTS in store.kv)
        store.delete(WEIGHTS)

    thread, errors = in_thread(operator)
    with pytest.raises(FatalError, match="its weights key /ctl/weights/web was deleted by"):
        run()
    thread.join(5)
    assert not errors and OWNER not in store.kv


def test_a_rollback_whose_etcd_stays_away_says_in_one_line_what_is_left_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a traceback over the rollback's own error: one line naming the weights key."""
    from registrar.commands import canary as canary_module

    monkeypatch.setattr(canary_module, "LIFT_WITHIN", 0.3)
    store = Store({WEIGHTS: weights()})
    command = CanaryCommand(cast(EtcdStore, store), settings("v2", "--canary", "10"),
                            io.StringIO())
    store.down = True
    with pytest.raises(FatalError) as raised:
        command._lift()
    message = str(raised.value)
    assert f"left behind: {WEIGHTS}" in message and "--abort" in message
    assert "\n" not in message
