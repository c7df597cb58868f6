"""effect_of: what each Docker container event means for a registration (pure)."""

from __future__ import annotations

import pytest

from registrar.core.lifecycle import Effect, effect_of, network_effect


@pytest.mark.parametrize(
    ("action", "effect"),
    [
        ("start", Effect.START),
        ("restart", Effect.START),
        ("unpause", Effect.REFRESH),
        ("rename", Effect.REFRESH),
        ("update", Effect.REFRESH),
        ("stop", Effect.WITHDRAW),
        ("die", Effect.DIED),
        ("remove", Effect.GONE),  # Podman
        ("exec_died", Effect.RECHECK),  # Podman: a health check's exec ended
        ("exec_die", Effect.NONE),  # Docker: its health_status events say it all
        ("pause", Effect.OUT),
        ("destroy", Effect.GONE),
        ("oom", Effect.NONE),
        ("create", Effect.NONE),
        ("attach", Effect.NONE),
        ("exec_create: sh -c true", Effect.NONE),
        ("exec_start: sh -c true", Effect.NONE),
        ("exec_die", Effect.NONE),
        ("top", Effect.NONE),
        ("", Effect.NONE),
        ("something-new", Effect.NONE),
    ],
)
def test_actions(action: str, effect: Effect) -> None:
    assert effect_of(action, {}, "SIGTERM") is effect


@pytest.mark.parametrize(
    "signal", ["15", "SIGTERM", "TERM", "2", "SIGINT", "INT", "3", "SIGQUIT", "QUIT",
               "9", "SIGKILL", "KILL"],
)
def test_kill_with_an_ending_signal_withdraws(signal: str) -> None:
    assert effect_of("kill", {"signal": signal, "name": "web-1"}, "SIGTERM") is Effect.WITHDRAW


@pytest.mark.parametrize("signal", ["1", "SIGHUP", "HUP", "10", "SIGUSR1", "USR1", "12",
                                    "SIGUSR2", "28", "SIGWINCH", "", "bogus", "²"])
def test_kill_with_another_signal_changes_nothing(signal: str) -> None:
    assert effect_of("kill", {"signal": signal}, "SIGTERM") is Effect.NONE


def test_kill_without_a_signal_attribute_changes_nothing() -> None:
    assert effect_of("kill", {}, "SIGTERM") is Effect.NONE


@pytest.mark.parametrize("stop_signal", ["SIGUSR1", "USR1", "10"])
@pytest.mark.parametrize("signal", ["10", "SIGUSR1"])
def test_the_containers_own_stop_signal_withdraws(stop_signal: str, signal: str) -> None:
    assert effect_of("kill", {"signal": signal}, stop_signal) is Effect.WITHDRAW
    # ... and the usual ending signals still do
    assert effect_of("kill", {"signal": "15"}, stop_signal) is Effect.WITHDRAW
    assert effect_of("kill", {"signal": "9"}, stop_signal) is Effect.WITHDRAW
    # another signal still does not
    assert effect_of("kill", {"signal": "1"}, stop_signal) is Effect.NONE


def test_httpd_stop_signal() -> None:
    assert effect_of("kill", {"signal": "28"}, "SIGWINCH") is Effect.WITHDRAW


@pytest.mark.parametrize(
    ("action", "effect"),
    [
        ("health_status: healthy", Effect.REFRESH),
        ("health_status:healthy", Effect.REFRESH),
        ("health_status: unhealthy", Effect.OUT),
        ("health_status: starting", Effect.NONE),
        ("health_status", Effect.REFRESH),  # Podman: the state is not in the event
    ],
)
def test_health_status(action: str, effect: Effect) -> None:
    assert effect_of(action, {}, "SIGTERM") is effect


def test_network_events_read_the_container_again() -> None:
    assert network_effect("connect") is Effect.REFRESH
    assert network_effect("disconnect") is Effect.REFRESH
    assert network_effect("create") is Effect.NONE and network_effect("destroy") is Effect.NONE
