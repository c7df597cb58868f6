"""Pure tests of `registrar haproxy`: registrations -> backends -> config text, the runtime-API
plan, and the debounce of `Registrations` (with a fake clock)."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registrar.adapters.etcd_store import KeyEvent
from registrar.haproxy.config import (
    INVALID_HOST,
    INVALID_JSON,
    INVALID_KEY,
    INVALID_PORT,
    MIN_SPARES,
    MISSING_HOST_OR_PORT,
    SERVER_NAME_RE,
    Registration,
    Rejected,
    RenderContext,
    Server,
    SlotState,
    TemplateError,
    build_backends,
    check_slots,
    fresh_layout,
    live_model,
    load_template,
    model_of,
    parse_registration,
    plan_runtime,
    render,
    server_name,
)
from registrar.haproxy.process import ProcInfo, parse_show_proc, runtime_dir, socket_paths
from registrar.haproxy.router import Registrations
from registrar.settings import Bind

PREFIX = "/services"


def value(host: object = "10.0.0.5", port: object = 32768, **extra: object) -> str:
    return json.dumps({"service": "web", "host": host, "port": port, **extra})


def reg(service: str, instance: str, host: str = "10.0.0.5", port: int = 32768) -> Registration:
    parsed = parse_registration(PREFIX, f"{PREFIX}/{service}/{instance}", value(host, port))
    assert isinstance(parsed, Registration), parsed
    return parsed


WEB = (Bind("web", "127.0.0.1", 8080),)


# --- parsing --------------------------------------------------------------------------------


def test_a_registrar_value_becomes_a_server_named_after_its_instance():
    parsed = parse_registration(PREFIX, "/services/web/core-01:web-1:8080", value())
    assert parsed == Registration(
        "web", Server("core-01:web-1:8080", "10.0.0.5", 32768, "core-01:web-1:8080")
    )
    assert parsed.server.address == "10.0.0.5:32768"


def test_ipv6_hosts_are_bracketed_and_normalised():
    parsed = parse_registration(PREFIX, "/services/web/n:c:80", value("0:0:0:0:0:0:0:1", 80))
    assert isinstance(parsed, Registration)
    assert parsed.server.host == "::1"
    assert parsed.server.address == "[::1]:80"
    mapped = parse_registration(PREFIX, "/services/web/n:c:80", value("::ffff:10.0.0.1", 80))
    assert isinstance(mapped, Registration) and mapped.server.host == "10.0.0.1"


@pytest.mark.parametrize(
    ("key", "raw", "reason"),
    [
        ("/services/web/i", "not json", INVALID_JSON),
        ("/services/web/i", "[1, 2]", INVALID_JSON),
        ("/services/web/i", '"a string"', INVALID_JSON),
        ("/services/web/i", json.dumps({"port": 80}), MISSING_HOST_OR_PORT),
        ("/services/web/i", json.dumps({"host": "10.0.0.1"}), MISSING_HOST_OR_PORT),
        ("/services/web/i", value(host="example.com"), INVALID_HOST),
        ("/services/web/i", value(host="10.0.0.1\n    server evil 1.2.3.4:80"), INVALID_HOST),
        ("/services/web/i", value(host=""), INVALID_HOST),
        ("/services/web/i", value(host=None), INVALID_HOST),
        ("/services/web/i", value(host=["10.0.0.1"]), INVALID_HOST),
        ("/services/web/i", value(host="0.0.0.0"), INVALID_HOST),
        ("/services/web/i", value(port="80"), INVALID_PORT),
        ("/services/web/i", value(port=0), INVALID_PORT),
        ("/services/web/i", value(port=65536), INVALID_PORT),
        ("/services/web/i", value(port=True), INVALID_PORT),
        ("/services/web/i", value(port=80.5), INVALID_PORT),
        ("/services/web", value(), INVALID_KEY),
        ("/services/web/", value(), INVALID_KEY),
        ("/services/web/a/b", value(), INVALID_KEY),
        ("/services/../i", value(), INVALID_KEY),
        ("/other/web/i", value(), INVALID_KEY),
    ],
)
def test_unusable_keys_and_values_are_rejected_with_a_reason(key, raw, reason):
    parsed = parse_registration(PREFIX, key, raw)
    assert isinstance(parsed, Rejected)
    assert parsed.reason == reason


def test_server_names_are_haproxy_safe_stable_and_distinct():
    assert server_name("core-01:web-1:8080:udp") == "core-01:web-1:8080:udp"
    hostile = ["a b", "a_b", "a\nb", "_spare1", "{{x}}", "é", "-x", "x" * 300, ""]
    names = [server_name(h) for h in hostile]
    assert len(set(names)) == len(names)
    for name in names:
        assert SERVER_NAME_RE.fullmatch(name), name
        assert not name.startswith("_spare")
    assert [server_name(h) for h in hostile] == names  # stable


# --- backends -------------------------------------------------------------------------------


def test_only_bound_services_get_backends_with_all_their_instances_sorted():
    binds = (Bind("web", "127.0.0.1", 8080), Bind("api", "::1", 9090),
             Bind("web", "10.0.0.1", 80))
    regs = [reg("web", "n2:b:8080", port=2), reg("web", "n1:a:8080", port=1),
            reg("other", "n1:x:8080"), reg("api", "n1:c:9090", port=3)]
    backends = build_backends(binds, regs)
    assert [b.service for b in backends] == ["web", "api"]
    web, api = backends
    assert web.binds == ("127.0.0.1:8080", "10.0.0.1:80")
    assert api.binds == ("[::1]:9090",)
    assert [s.instance for s in web.servers] == ["n1:a:8080", "n2:b:8080"]
    assert (web.frontend, web.backend) == ("fe_web", "be_web")
    assert build_backends(binds, [])[0].servers == ()
    assert web.spares == MIN_SPARES


def ctx(mode: str = "tcp") -> RenderContext:
    return RenderContext(mode=mode, prefix=PREFIX, stats_socket="/run/haproxy-stats.sock")


def test_builtin_template_in_tcp_mode():
    regs = [reg("web", "n1:a:8080", "10.0.0.5", 32768), reg("web", "n2:b:8080", "10.0.0.6", 1)]
    text = render(load_template(None), build_backends(WEB, regs), regs, ctx("tcp"))
    assert "    mode tcp\n" in text
    assert "timeout http-request" not in text
    assert "    stats socket /run/haproxy-stats.sock mode 600 level admin\n" in text
    assert (
        "frontend fe_web\n"
        "    bind 127.0.0.1:8080\n"
        "    default_backend be_web\n"
        "\n"
        "backend be_web\n"
        "    balance roundrobin\n"
        "    server n1:a:8080 10.0.0.5:32768\n"
        "    server n2:b:8080 10.0.0.6:1\n"
        f"    server-template _spare 1-{MIN_SPARES} 127.0.0.1:1 disabled\n"
    ) in text
    assert "{" not in text and "}" not in text  # no template syntax left over


def test_builtin_template_in_http_mode_without_a_stats_socket():
    text = render(load_template(None), build_backends(WEB, []), [],
                  RenderContext(mode="http", prefix=PREFIX))
    assert "    mode http\n" in text
    assert "    timeout http-request 10s\n" in text
    assert "stats socket" not in text
    assert "backend be_web\n    balance roundrobin\n    server-template _spare" in text


def test_rendering_is_deterministic():
    regs = [reg("web", f"n1:c{i}:8080", port=1000 + i) for i in range(5)]
    a = render(load_template(None), build_backends(WEB, regs), regs, ctx())
    b = render(load_template(None), build_backends(WEB, list(reversed(regs))), regs, ctx())
    assert a == b


def test_operator_template_sees_backends_services_and_mode(tmp_path):
    path = tmp_path / "t.j2"
    # trim_blocks and lstrip_blocks are on: a line holding only a block tag leaves nothing
    path.write_text(
        "# {{ mode }} {{ prefix }}\n"
        "{% for b in backends %}\n"
        "{{ b.backend }}:\n"
        "    {% for s in b.servers %}\n"
        "  {{ s.name }}={{ s.address }}\n"
        "    {% endfor %}\n"
        "{% endfor %}\n"
        "{% for name, servers in services.items() %}\n"
        "{{ name }}={{ servers|length }}\n"
        "{% endfor %}\n"
    )
    regs = [reg("web", "n1:a:8080", "10.0.0.5", 1), reg("db", "n1:d:5432", "10.0.0.7", 2)]
    text = render(load_template(str(path)), build_backends(WEB, regs), regs, ctx("http"))
    assert text == "# http /services\nbe_web:\n  n1:a:8080=10.0.0.5:1\ndb=1\nweb=1\n"


def test_broken_templates_raise_template_error(tmp_path):
    syntax = tmp_path / "syntax.j2"
    syntax.write_text("{% for b in backends %}\n")
    with pytest.raises(TemplateError, match="line"):
        load_template(str(syntax))
    with pytest.raises(TemplateError):
        load_template(str(tmp_path / "missing.j2"))
    undefined = tmp_path / "undefined.j2"
    undefined.write_text("{{ no_such_thing }}\n")
    with pytest.raises(TemplateError, match="no_such_thing"):
        render(load_template(str(undefined)), build_backends(WEB, []), [], ctx())


# --- the runtime API plan -------------------------------------------------------------------


def test_servers_coming_and_going_use_spare_slots_then_freed_ones():
    a, b, c = reg("web", "n:a:1", port=1), reg("web", "n:b:1", port=2), reg("web", "n:c:1", port=3)
    live = fresh_layout(build_backends(WEB, [a]))
    plan = plan_runtime(live, build_backends(WEB, [a, b]))
    assert plan is not None
    assert plan.commands == (
        "set server be_web/_spare1 addr 10.0.0.5 port 2",
        "set server be_web/_spare1 state ready",
    )
    assert plan.expect == (SlotState("be_web", "_spare1", b.server),)
    assert live_model(plan.live) == model_of(build_backends(WEB, [a, b]))

    # a leaves (maintenance, the slot freed last), c comes (the next never-used spare)
    plan2 = plan_runtime(plan.live, build_backends(WEB, [b, c]))
    assert plan2 is not None
    assert plan2.commands == (
        "set server be_web/_spare2 addr 10.0.0.5 port 3",
        "set server be_web/_spare2 state ready",
        "set server be_web/n:a:1 state maint",
    )
    assert plan2.live["web"].free[-1] == "n:a:1"
    assert plan2.live["web"].slots["n:a:1"] is None

    # nothing changed: no command
    same = plan_runtime(plan2.live, build_backends(WEB, [b, c]))
    assert same is not None and same.empty


def test_an_instance_that_moves_gets_its_slot_readdressed():
    live = fresh_layout(build_backends(WEB, [reg("web", "n:a:1", port=1)]))
    plan = plan_runtime(live, build_backends(WEB, [reg("web", "n:a:1", "10.0.0.9", 7)]))
    assert plan is not None
    assert plan.commands == ("set server be_web/n:a:1 addr 10.0.0.9 port 7",)


def test_a_reload_is_needed_when_slots_run_out_or_backends_change():
    regs = [reg("web", f"n:c{i}:1", port=i + 1) for i in range(MIN_SPARES + 1)]
    empty = fresh_layout(build_backends(WEB, []))
    assert plan_runtime(empty, build_backends(WEB, regs[:MIN_SPARES])) is not None
    assert plan_runtime(empty, build_backends(WEB, regs)) is None
    two = (*WEB, Bind("api", "127.0.0.1", 9090))
    assert plan_runtime(empty, build_backends(two, [])) is None


def test_check_slots_reads_show_servers_state():
    state = (
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
        "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
        "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
        "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr "
        "srv_agent_port\n"
        "3 be_web 1 n:a:1 10.0.0.5 0 5 1 1 9 1 0 0 8 0 0 0 - 1 - 0 0 - - 0\n"
        "3 be_web 2 _spare1 10.0.0.5 2 4 1 1 0 1 0 0 8 0 0 0 - 2 - 0 0 - - 0\n"
        "3 be_web 3 _spare2 ::1 2 4 1 1 0 1 0 0 8 0 0 0 - 3 - 0 0 - - 0\n"
    )
    b = Server("n:b:1", "10.0.0.5", 2, "n:b:1")
    assert check_slots(state, [SlotState("be_web", "n:a:1", None),
                               SlotState("be_web", "_spare1", b),
                               SlotState("be_web", "_spare2", Server("x", "::1", 3, "x"))]) == []
    problems = check_slots(state, [SlotState("be_web", "_spare1", None),
                                   SlotState("be_web", "n:a:1", b),
                                   SlotState("be_web", "nope", b)])
    assert len(problems) == 4


# --- Registrations: what counts as a change, and the debounce ------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_registrations_count_rejections_once_and_ignore_repeats():
    rejected: list[tuple[str, str]] = []
    regs = Registrations(PREFIX, lambda key, why: rejected.append((key, why.reason)))
    regs.replace_all({"/services/web/a": value(port=1), "/services/web/bad": "nope"})
    assert [r.server.instance for r in regs.snapshot()] == ["a"]
    assert rejected == [("/services/web/bad", INVALID_JSON)]
    stop = threading.Event()
    assert regs.wait_batch(stop, 0) is not None  # the first read is always a change
    regs.apply([KeyEvent("/services/web/bad", "nope", 5), KeyEvent("/services/web/a",
                                                                   value(port=1), 5)])
    assert rejected == [("/services/web/bad", INVALID_JSON)]
    assert regs.wait_batch(stop, 0) is None  # same values: nothing to apply
    regs.apply([KeyEvent("/services/web/a", None, 6)])
    assert regs.wait_batch(stop, 0) == []


def test_debounce_waits_for_quiet_but_never_longer_than_the_max_delay(monkeypatch):
    clock = FakeClock()
    regs = Registrations(PREFIX, quiet=0.1, max_delay=1.0, clock=clock)
    regs.replace_all({})
    stop = threading.Event()
    waits: list[float] = []

    # Each wait advances the clock; a new change arrives every 50 ms (never quiet for 100 ms).
    def fake_wait(timeout: float | None = None) -> bool:
        step = min(timeout or 0.0, 0.05)
        waits.append(step)
        clock.now += step
        regs._raw.pop("/services/web/x", None)
        regs._set("/services/web/x", value(port=int(clock.now * 1000) % 60000 + 1))
        regs._changed()
        return True

    monkeypatch.setattr(regs._cond, "wait", fake_wait)
    started = clock.now
    batch = regs.wait_batch(stop, timeout=5)
    assert batch is not None
    assert clock.now - started == pytest.approx(1.0, abs=0.06)  # the max delay bounds it


def test_debounce_applies_after_100ms_of_quiet(monkeypatch):
    clock = FakeClock()
    regs = Registrations(PREFIX, quiet=0.1, max_delay=1.0, clock=clock)
    regs.replace_all({})

    def fake_wait(timeout: float | None = None) -> bool:
        clock.now += timeout or 0.0
        return True

    monkeypatch.setattr(regs._cond, "wait", fake_wait)
    started = clock.now
    assert regs.wait_batch(threading.Event(), timeout=5) == []
    assert clock.now - started == pytest.approx(0.1, abs=1e-6)


# --- hostile input cannot shape the config --------------------------------------------------

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                          st.text(max_size=40))
_hostile_values = st.one_of(
    st.text(max_size=80),
    st.fixed_dictionaries({"host": _json_scalars, "port": _json_scalars}).map(json.dumps),
    st.fixed_dictionaries({"host": st.sampled_from(["10.0.0.1", "::1", "10.0.0.1\nbind :1"]),
                           "port": st.integers(-5, 70000)}).map(json.dumps),
)


@settings(max_examples=300, deadline=None)
@given(instance=st.text(min_size=1, max_size=60), raw=_hostile_values)
def test_hostile_keys_and_values_never_add_config_lines(instance, raw):
    parsed = parse_registration(PREFIX, f"{PREFIX}/web/{instance}", raw)
    regs = [parsed] if isinstance(parsed, Registration) else []
    text = render(load_template(None), build_backends(WEB, regs), regs, ctx())
    empty = render(load_template(None), build_backends(WEB, []), [], ctx())
    extra = [line for line in text.splitlines() if line not in empty.splitlines()]
    assert len(extra) == len(regs)
    for line in extra:
        assert re.fullmatch(r"    server [A-Za-z0-9][A-Za-z0-9._:-]* \S+:\d{1,5}", line), line


# --- haproxy_process helpers ----------------------------------------------------------------


def test_show_proc_gives_reloads_failures_and_current_workers():
    text = (
        "#<PID>          <type>          <reloads>       <uptime>        <version>      \n"
        "11286           master          1 [failed: 1]   0d00h00m09s     2.6.12-1+deb12u4\n"
        "# workers\n"
        "11289           worker          1               0d00h00m09s     2.6.12-1+deb12u4\n"
        "# old workers\n"
        "11100           worker          2               0d00h01m09s     2.6.12-1+deb12u4\n"
        "# programs\n\n"
    )
    assert parse_show_proc(text) == ProcInfo(reloads=1, failed=1, workers=(11289,))
    assert parse_show_proc("Unknown command\n") is None


def test_sockets_go_next_to_the_config_unless_the_path_is_too_long(tmp_path):
    directory, temporary = runtime_dir(str(tmp_path / "haproxy.cfg"))
    assert (directory, temporary) == (str(tmp_path), False)
    assert socket_paths(directory, "/x/haproxy.cfg") == (
        f"{tmp_path}/haproxy-master.sock", f"{tmp_path}/haproxy-stats.sock")
    deep = tmp_path / ("d" * 120) / "haproxy.cfg"
    directory, temporary = runtime_dir(str(deep))
    try:
        assert temporary and len(socket_paths(directory, str(deep))[0]) < 100
    finally:
        os.rmdir(directory)
