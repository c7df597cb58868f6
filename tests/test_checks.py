"""core.checks: check labels -> specs, the rise/fall state machine, the HTTP bytes (pure).

Labels are hostile input: any value either gives a valid spec or raises InvalidCheck naming
its label; nothing else.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registrar.core.checks import (
    INITIAL,
    MAX_PATH,
    NO_CHECKS,
    NOT_HTTP,
    Checks,
    CheckSpec,
    CheckState,
    InvalidCheck,
    Phase,
    after,
    http_request,
    http_status,
    http_verdict,
    in_rotation,
    parse_checks,
)
from tests.hypothesis_profiles import examples

TCP = CheckSpec("tcp", None)


def spec(labels: dict[str, str], port: int = 8080) -> CheckSpec | None:
    return parse_checks(labels).for_port(port)


# --- labels: what they give -------------------------------------------------------------


def test_no_check_label_no_checks() -> None:
    assert parse_checks({}) is NO_CHECKS
    assert parse_checks({"registrar.service": "web"}).for_port(8080) is None


def test_defaults_are_the_specs() -> None:
    assert spec({"registrar.check": "tcp"}) == CheckSpec("tcp", None, 2.0, 1.0, 1, 2)
    assert spec({"registrar.check": "http:/health"}) == CheckSpec(
        "http", "/health", 2.0, 1.0, 1, 2
    )


@pytest.mark.parametrize(
    ("interval", "timeout"),
    [("2", 1.0), ("0.2", 0.1), ("0.5", 0.25), (".5", 0.25), ("1", 0.5), ("3", 1.0),
     ("60", 1.0), ("3600", 1.0), ("2.", 1.0)],
)
def test_default_timeout_is_half_the_interval_at_most_one(interval: str, timeout: float) -> None:
    got = spec({"registrar.check": "tcp", "registrar.check.interval": interval})
    assert got is not None
    assert got.interval == float(interval)
    assert got.timeout == pytest.approx(timeout)


def test_numbers_apply_to_every_checked_port() -> None:
    checks = parse_checks({
        "registrar.check": "tcp", "registrar.9090.check": "http:/m",
        "registrar.check.interval": "5", "registrar.check.timeout": "4.5",
        "registrar.check.rise": "3", "registrar.check.fall": "100",
    })
    assert checks.for_port(8080) == CheckSpec("tcp", None, 5.0, 4.5, 3, 100)
    assert checks.for_port(9090) == CheckSpec("http", "/m", 5.0, 4.5, 3, 100)


def test_per_port_label_wins_and_other_ports_are_unchecked_without_a_default() -> None:
    checks = parse_checks({"registrar.check": "tcp", "registrar.9090.check": "http:/ready"})
    assert checks.for_port(8080) == TCP
    assert checks.for_port(9090) == CheckSpec("http", "/ready")
    only = parse_checks({"registrar.9090.check": "tcp"})
    assert only.for_port(9090) == TCP
    assert only.for_port(8080) is None


def test_udp_ports_are_not_checked() -> None:
    checks = parse_checks({"registrar.check": "tcp", "registrar.53.check": "tcp"})
    assert checks.for_port(53, "udp") is None
    assert checks.for_port(53, "tcp") == TCP


@pytest.mark.parametrize(
    "labels",
    [
        {"registrar.check.interval": "nan"},
        {"registrar.check.timeout": "-1", "registrar.check.rise": "0"},
        {"registrar.check.intervall": "2"},
        {"registrar.check.fall": ""},
    ],
)
def test_numbers_without_a_check_label_are_ignored(labels: dict[str, str]) -> None:
    assert parse_checks({"registrar.service": "web", **labels}) is NO_CHECKS


@pytest.mark.parametrize(
    "path",
    ["/", "/health", "/a/b/c", "/health?full=1&x=y", "/%7Euser", "/a;b=c", "/~x/_y-z.json",
     "/a:b@c", "/" + "x" * (MAX_PATH - 1), "/!$&'()*+,="],
)
def test_good_paths(path: str) -> None:
    assert spec({"registrar.check": f"http:{path}"}) == CheckSpec("http", path)


# --- labels: what is refused -------------------------------------------------------------

BAD_KINDS = [
    "", " ", "TCP", "tcp ", " tcp", "udp", "http", "http:", "https:/x", "http:health",
    "http: /x", "http:/a b", "http:/a\r\nHost: evil", "http:/a\nx", "http:/a\x00", "http:/\x7f",
    "http:/a#frag", "http:/é", "http:/%zz", "http:/%4", "http:/a\tb", 'http:/"x"', "http:/<x>",
    "http:/a\\b", "http:/{x}", "http:/a|b", "http:/a^b", "http:/`x`", "http://evil/x",
    "http:/" + "x" * MAX_PATH, "tcp:/x", "none", "off", "http:/\u200b", "\uff54cp",
]


@pytest.mark.parametrize("bad", BAD_KINDS)
@pytest.mark.parametrize("label", ["registrar.check", "registrar.8080.check"])
def test_bad_check_kind_is_refused_naming_the_label(label: str, bad: str) -> None:
    with pytest.raises(InvalidCheck) as caught:
        parse_checks({label: bad})
    assert caught.value.label == label
    assert label in str(caught.value)


BAD_INTERVALS = [
    "", " ", "0", "0.1", "0.19", "-1", "-0.5", "+2", "nan", "NaN", "inf", "-inf", "Infinity",
    "1e400", "1e3", "1E1", "0x10", "2s", "2 ", " 2", "1_000", "٣", "²", "3601", "99999999",
    "1" * 40, "1.2.3", ".", "..5", "1,5",
]


@pytest.mark.parametrize("bad", BAD_INTERVALS)
def test_bad_interval_is_refused(bad: str) -> None:
    with pytest.raises(InvalidCheck) as caught:
        parse_checks({"registrar.check": "tcp", "registrar.check.interval": bad})
    assert caught.value.label == "registrar.check.interval"


@pytest.mark.parametrize(
    ("interval", "timeout"),
    [(None, "0"), (None, "0.0"), (None, "2.5"), ("1", "1.01"), ("0.5", "0.6"), (None, "nan"),
     (None, "1e400"), (None, "-1"), (None, ""), (None, "inf"), ("3600", "3601")],
)
def test_bad_timeout_is_refused(interval: str | None, timeout: str) -> None:
    labels = {"registrar.check": "tcp", "registrar.check.timeout": timeout}
    if interval is not None:
        labels["registrar.check.interval"] = interval
    with pytest.raises(InvalidCheck) as caught:
        parse_checks(labels)
    assert caught.value.label == "registrar.check.timeout"


def test_timeout_may_equal_the_interval() -> None:
    got = spec({"registrar.check": "tcp", "registrar.check.interval": "0.5",
                "registrar.check.timeout": "0.5"})
    assert got is not None and got.timeout == 0.5


@pytest.mark.parametrize("bad", ["0", "101", "-1", "1.0", "1.5", "", " 1", "1e1", "nan",
                                 "1000", "٣", "0x1", "+1"])
@pytest.mark.parametrize("word", ["rise", "fall"])
def test_bad_rise_or_fall_is_refused(word: str, bad: str) -> None:
    with pytest.raises(InvalidCheck) as caught:
        parse_checks({"registrar.check": "tcp", f"registrar.check.{word}": bad})
    assert caught.value.label == f"registrar.check.{word}"


@pytest.mark.parametrize("good", ["1", "100", "01", "42"])
def test_rise_and_fall_range(good: str) -> None:
    got = spec({"registrar.check": "tcp", "registrar.check.rise": good,
                "registrar.check.fall": good})
    assert got is not None and got.rise == got.fall == int(good)


@pytest.mark.parametrize("name", ["registrar.check.intervall", "registrar.check.", "registrar."
                                  "check.Interval", "registrar.check.interval.x"])
def test_unknown_check_setting_is_refused_when_there_is_a_check(name: str) -> None:
    with pytest.raises(InvalidCheck) as caught:
        parse_checks({"registrar.check": "tcp", name: "2"})
    assert caught.value.label == name


def test_a_bad_per_port_label_refuses_even_for_a_port_not_published() -> None:
    with pytest.raises(InvalidCheck):
        parse_checks({"registrar.check": "tcp", "registrar.9999.check": "bogus"})


def test_the_detail_is_bounded() -> None:
    with pytest.raises(InvalidCheck) as caught:
        parse_checks({"registrar.check": "http:/" + "\x1b" * 10_000})
    assert len(str(caught.value)) < 400


def test_a_spec_built_by_hand_is_checked_too() -> None:
    for bad in [dict(kind="tcp", path="/x"), dict(kind="http", path=None),
                dict(kind="tcp", path=None, interval=0.1),
                dict(kind="tcp", path=None, interval=1, timeout=2),
                dict(kind="tcp", path=None, rise=0), dict(kind="udp", path=None)]:
        with pytest.raises(ValueError):
            CheckSpec(**bad)  # type: ignore[arg-type]


# --- labels: the property ----------------------------------------------------------------

CHECK_NAMES = [
    "registrar.check", "registrar.8080.check", "registrar.9090.check", "registrar.check.interval",
    "registrar.check.timeout", "registrar.check.rise", "registrar.check.fall",
    "registrar.check.x", "registrar.99999999.check", "registrar.service",
]
values = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="ascii"), max_size=80),
    st.sampled_from(["tcp", "http:/", "http:/health", "http:", "2", "0.2", "0.1", "1", "100",
                     "101", "0", "nan", "inf", "1e400", "-1", "", " ", "1" * 30, "3600",
                     "0.19999999999999999999"]),
    st.from_regex(r"http:/[ -~]{0,20}", fullmatch=True),
    st.from_regex(r"[0-9]{0,4}(\.[0-9]{0,4})?", fullmatch=True),
)


@settings(max_examples=examples(300), deadline=None)
@given(labels=st.dictionaries(st.one_of(st.sampled_from(CHECK_NAMES), st.text(max_size=20)),
                              values, max_size=7))
def test_property_a_valid_spec_or_invalid_check(labels: dict[str, str]) -> None:
    try:
        checks = parse_checks(labels)
    except InvalidCheck as exc:
        assert exc.label in labels or exc.label == next(n for n in labels if n[:64] == exc.label)
        assert str(exc).strip() and len(str(exc)) < 400
        return
    assert isinstance(checks, Checks)
    for one in [checks.default, *checks.per_port.values()]:
        if one is None:
            continue
        assert one.interval >= 0.2 and 0 < one.timeout <= one.interval and one.timeout <= 3600
        assert 1 <= one.rise <= 100 and 1 <= one.fall <= 100
        if one.path is not None:
            request = http_request("10.0.0.5", 80, one.path)
            request_line = request.split(b"\r\n", 1)[0]
            assert re.fullmatch(rb"GET /[!-~]* HTTP/1\.0", request_line), request_line


# --- rise and fall --------------------------------------------------------------------------

P, F = True, False


def run(results: list[bool], rise: int, fall: int) -> list[bool]:
    """In rotation after each result."""
    check = CheckSpec("tcp", None, rise=rise, fall=fall)
    state, seen = INITIAL, []
    for passed in results:
        state = after(state, passed, check)
        seen.append(in_rotation(state))
    return seen


@pytest.mark.parametrize(
    ("rise", "fall", "results", "expected"),
    [
        (1, 2, [], []),
        (1, 2, [P], [1]),
        (1, 2, [F], [0]),
        (1, 2, [P, F], [1, 1]),
        (1, 2, [P, F, F], [1, 1, 0]),
        (1, 2, [P, F, P, F, P, F], [1, 1, 1, 1, 1, 1]),  # never two failures in a row
        (1, 2, [P, F, F, P], [1, 1, 0, 1]),
        (1, 1, [P, F, P, F], [1, 0, 1, 0]),
        (3, 2, [P, P, P], [0, 0, 1]),
        (3, 2, [P, P, F, P, P, P], [0, 0, 0, 0, 0, 1]),  # a failure restarts the count
        (3, 2, [F, F, F, P, P, P, F], [0, 0, 0, 0, 0, 1, 1]),
        (3, 2, [P, P, P, F, F, P, P, P], [0, 0, 1, 1, 0, 0, 0, 1]),  # rise again to come back
        (2, 3, [P, P, F, F, P, F, F, F], [0, 1, 1, 1, 1, 1, 1, 0]),
        (100, 1, [P] * 99 + [F] + [P] * 100, [0] * 199 + [1]),
        (1, 100, [P] + [F] * 99 + [P] + [F] * 100, [1] * 200 + [0]),
    ],
)
def test_rise_and_fall(rise: int, fall: int, results: list[bool], expected: list[int]) -> None:
    assert run(results, rise, fall) == [bool(e) for e in expected]


def test_the_state_is_plain_data() -> None:
    check = CheckSpec("tcp", None, rise=2, fall=2)
    assert CheckState(Phase.OUT, 0) == INITIAL and not in_rotation(INITIAL)
    assert after(INITIAL, True, check) == CheckState(Phase.OUT, 1)
    assert after(CheckState(Phase.OUT, 1), True, check) == CheckState(Phase.IN, 0)
    assert after(CheckState(Phase.IN, 0), True, check) == CheckState(Phase.IN, 0)
    assert after(CheckState(Phase.IN, 0), False, check) == CheckState(Phase.IN, 1)
    assert after(CheckState(Phase.IN, 1), True, check) == CheckState(Phase.IN, 0)
    assert after(CheckState(Phase.IN, 1), False, check) == CheckState(Phase.OUT, 0)
    assert after(CheckState(Phase.OUT, 1), False, check) == CheckState(Phase.OUT, 0)


@settings(max_examples=examples(300), deadline=None)
@given(rise=st.integers(1, 6), fall=st.integers(1, 6), results=st.lists(st.booleans(),
                                                                        max_size=60))
def test_property_rotation_follows_the_last_results(
    rise: int, fall: int, results: list[bool]
) -> None:
    """In after `rise` passes in a row while out; out after `fall` failures in a row while in."""
    seen = run(results, rise, fall)
    for i, now_in in enumerate(seen):
        before = seen[i - 1] if i else False
        tail = results[: i + 1]
        if not before and now_in:
            assert tail[-rise:] == [True] * rise
        if before and not now_in:
            assert tail[-fall:] == [False] * fall
        if not before and not now_in and len(tail) >= rise:
            assert tail[-rise:] != [True] * rise
        if before and now_in and len(tail) >= fall:
            assert tail[-fall:] != [False] * fall


# --- HTTP -------------------------------------------------------------------------------------


def test_http_request_ipv4() -> None:
    assert http_request("10.0.0.5", 32768, "/health?x=1") == (
        b"GET /health?x=1 HTTP/1.0\r\n"
        b"Host: 10.0.0.5:32768\r\n"
        b"User-Agent: registrar-check\r\n"
        b"Accept: */*\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("host", "header"),
    [("::1", b"Host: [::1]:80\r\n"), ("fd00::5", b"Host: [fd00::5]:80\r\n"),
     ("fe80::1%eth0", b"Host: [fe80::1%25eth0]:80\r\n")],
)
def test_http_request_ipv6_host_is_bracketed(host: str, header: bytes) -> None:
    request = http_request(host, 80, "/")
    assert header in request
    assert request.startswith(b"GET / HTTP/1.0\r\n") and request.endswith(b"\r\n\r\n")


@pytest.mark.parametrize("path", ["", "x", "/a b", "/a\r\n", "/é", "/#x"])
def test_http_request_refuses_a_bad_path(path: str) -> None:
    with pytest.raises(ValueError):
        http_request("10.0.0.5", 80, path)


@pytest.mark.parametrize("host", ["", "a b", "10.0.0.5\r\nX: y", "a/b", "[::1]", "é"])
def test_http_request_refuses_a_bad_host(host: str) -> None:
    with pytest.raises(ValueError):
        http_request(host, 80, "/")


@pytest.mark.parametrize(
    ("first_bytes", "status", "verdict"),
    [
        (b"", None, None),
        (b"HTTP/1.1 200", None, None),  # the line is not complete yet
        (b"HTTP/1.1 200 OK\r", None, None),
        (b"HTTP/1.1 200 OK\r\n", 200, True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, True),
        (b"HTTP/1.1 204 No Content\r\n", 204, True),
        (b"HTTP/1.1 301 Moved Permanently\r\n", 301, True),
        (b"HTTP/1.1 399 Odd\r\n", 399, True),
        (b"HTTP/1.1 200\r\n", 200, True),  # no reason phrase
        (b"HTTP/1.1 200 \r\n", 200, True),
        (b"HTTP/1.1 200 OK\n", 200, True),  # a bare LF
        (b"HTTP/1.1 200 \xc3\xa9t\xe9\r\n", 200, True),  # obs-text in the reason
        (b"HTTP/1.1 400 Bad Request\r\n", 400, False),
        (b"HTTP/1.1 404 Not Found\r\n", 404, False),
        (b"HTTP/1.1 500 Internal Server Error\r\n", 500, False),
        (b"HTTP/1.1 503 Service Unavailable\r\n", 503, False),
        (b"HTTP/1.1 100 Continue\r\n", 100, False),
        (b"HTTP/1.1 199\r\n", 199, False),
        (b"HTTP/1.1 2000 OK\r\n", NOT_HTTP, False),
        (b"HTTP/1.1 20 OK\r\n", NOT_HTTP, False),
        (b"HTTP/1.1 abc OK\r\n", NOT_HTTP, False),
        (b"HTTP/1.1  200 OK\r\n", NOT_HTTP, False),
        (b"http/1.1 200 OK\r\n", NOT_HTTP, False),
        (b"HTTP/2 200\r\n", NOT_HTTP, False),
        (b"SSH-2.0-OpenSSH_9.6\r\n", NOT_HTTP, False),
        (b"\r\n", NOT_HTTP, False),
        (b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\n", NOT_HTTP, False),  # an HTTP/2 frame
        (b"HTTP/1.1 200 " + b"x" * 600, NOT_HTTP, False),  # no line end within the bound
        (b"HTTP/1.1 200 " + b"x" * 600 + b"\r\n", NOT_HTTP, False),
    ],
)
def test_http_status_and_verdict(first_bytes: bytes, status: int | None,
                                 verdict: bool | None) -> None:
    assert http_status(first_bytes) == status
    assert http_verdict(first_bytes) is verdict


@settings(max_examples=examples(300), deadline=None)
@given(st.binary(max_size=700))
def test_property_any_answer_has_a_verdict_or_needs_more(data: bytes) -> None:
    verdict = http_verdict(data)
    assert verdict in (True, False, None)
    if verdict is None:
        assert b"\n" not in data and len(data) < 512
    if verdict:
        assert data.startswith(b"HTTP/") and data[9:10] in (b"2", b"3")
