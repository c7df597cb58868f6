"""Pure tests of `registrar haproxy`: registrations -> backends -> config text, the runtime-API
plan, and the debounce of `Registrations` (with a fake clock)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registrar.core.control import Canary
from registrar.haproxy.config import (
    DEFAULT_WEIGHT,
    INVALID_HOST,
    INVALID_JSON,
    INVALID_KEY,
    INVALID_PORT,
    MIN_SPARES,
    MISSING_HOST_OR_PORT,
    SERVER_NAME_RE,
    Rejected,
    RenderContext,
    Routed,
    Server,
    TemplateError,
    build_backends,
    load_template,
    parse_registration,
    render,
    server_name,
    server_weights,
)
from registrar.haproxy.process import runtime_dir, socket_paths
from registrar.haproxy.runtime import fresh_layout, plan_runtime
from registrar.settings import Bind
from tests.hypothesis_profiles import examples

GOLDEN = Path(__file__).with_name("golden")
REGENERATE = os.environ.get("REGISTRAR_REGENERATE_GOLDEN") == "1"
PREFIX = "/services"


def value(host: object = "10.0.0.5", port: object = 32768, **extra: object) -> str:
    return json.dumps({"service": "web", "host": host, "port": port, **extra})


def reg(service: str, instance: str, host: str = "10.0.0.5", port: int = 32768,
        version: str | None = None) -> Routed:
    extra = {} if version is None else {"version": version}
    parsed = parse_registration(PREFIX, f"{PREFIX}/{service}/{instance}",
                                value(host, port, **extra))
    assert isinstance(parsed, Routed), parsed
    return parsed


WEB = (Bind("web", "127.0.0.1", 8080),)


# --- parsing --------------------------------------------------------------------------------


def test_a_registrar_value_becomes_a_server_named_after_its_instance() -> None:
    parsed = parse_registration(PREFIX, "/services/web/core-01:web-1:8080", value())
    assert parsed == Routed(
        "web", Server("core-01:web-1:8080", "10.0.0.5", 32768, "core-01:web-1:8080")
    )
    versioned = parse_registration(PREFIX, "/services/web/n:c:80", value(version="abc123"))
    assert isinstance(versioned, Routed) and versioned.server.version == "abc123"
    odd = parse_registration(PREFIX, "/services/web/n:c:80", value(version=7))
    assert isinstance(odd, Routed) and odd.server.version is None
    assert parsed.server.address == "10.0.0.5:32768"


def test_ipv6_hosts_are_bracketed_and_normalised() -> None:
    parsed = parse_registration(PREFIX, "/services/web/n:c:80", value("0:0:0:0:0:0:0:1", 80))
    assert isinstance(parsed, Routed)
    assert parsed.server.host == "::1"
    assert parsed.server.address == "[::1]:80"
    mapped = parse_registration(PREFIX, "/services/web/n:c:80", value("::ffff:10.0.0.1", 80))
    assert isinstance(mapped, Routed) and mapped.server.host == "10.0.0.1"


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
def test_unusable_keys_and_values_are_rejected_with_a_reason(key: str, raw: str,
                                                             reason: str) -> None:
    parsed = parse_registration(PREFIX, key, raw)
    assert isinstance(parsed, Rejected)
    assert parsed.reason == reason


def test_server_names_are_haproxy_safe_stable_and_distinct() -> None:
    assert server_name("core-01:web-1:8080:udp") == "core-01:web-1:8080:udp"
    hostile = ["a b", "a_b", "a\nb", "_spare1", "{{x}}", "é", "-x", "x" * 300, ""]
    names = [server_name(h) for h in hostile]
    assert len(set(names)) == len(names)
    for name in names:
        assert SERVER_NAME_RE.fullmatch(name), name
        assert not name.startswith("_spare")
    assert [server_name(h) for h in hostile] == names  # stable


# --- backends -------------------------------------------------------------------------------


def test_only_bound_services_get_backends_with_all_their_instances_sorted() -> None:
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
    return RenderContext(mode=mode, prefix=PREFIX, stats_socket="/run/haproxy-stats.sock",
                         log_socket="/run/haproxy-log.sock")


def golden(name: str, text: str) -> None:
    """Compares with tests/golden/NAME (REGISTRAR_REGENERATE_GOLDEN=1 rewrites it: `make
    golden`); on a difference, the assertion shows a unified diff."""
    path = GOLDEN / name
    if REGENERATE:
        path.write_text(text)
    expected = path.read_text() if path.exists() else ""
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            f"golden/{name}", "rendered"))
        raise AssertionError(f"rendered config differs from golden/{name} "
                             f"(`make golden` to accept):\n{diff}")


def test_builtin_template_tcp_golden() -> None:
    regs = [reg("web", "n1:a:8080", "10.0.0.5", 32768), reg("web", "n2:b:8080", "10.0.0.6", 1)]
    binds = (*WEB, Bind("db", "127.0.0.1", 5432))
    text = render(load_template(None), build_backends(binds, regs), regs, ctx("tcp"))
    golden("haproxy-tcp.cfg", text)
    assert "{" not in text and "}" not in text  # no template syntax left over


def test_builtin_template_http_golden_without_a_stats_socket() -> None:
    regs = [reg("web", "n1:a:8080", "fd00::5", 8080, "v1"),
            reg("web", "n1:b:8080", "10.0.0.6", 8081, "v2")]
    text = render(load_template(None),
                  build_backends(WEB, regs, {"web": Canary("v2", 10)}), regs,
                  RenderContext(mode="http", prefix=PREFIX))
    golden("haproxy-http-canary.cfg", text)
    assert "stats socket" not in text


def test_builtin_template_header_and_sticky_canary_golden() -> None:
    """--header: two backends chosen by the header; --sticky: a dynamic cookie. Both only
    while the weights key asks for them, and both outside what the runtime API changes."""
    regs = [reg("web", "n1:a:8080", "10.0.0.5", 8080, "v1"),
            reg("web", "n2:a:8080", "10.0.0.7", 8080, "v1"),
            reg("web", "n1:b:8080", "10.0.0.6", 8081, "v2")]
    canary = Canary("v2", 10, header="X-Canary", sticky=True)
    backends = build_backends(WEB, regs, {"web": canary})
    text = render(load_template(None), backends, regs, ctx("http"))
    golden("haproxy-http-canary-header-sticky.cfg", text)
    assert "use_backend be_web_always if { req.hdr(X-Canary) -m str always }" in text
    assert "cookie registrar-web insert indirect nocache dynamic" in text
    # a POST routed by the header is never sent twice either
    assert text.count("disable-l7-retry if !{ method GET HEAD OPTIONS PUT DELETE }") == 3
    [web] = backends
    assert [s.name for s in web.canary_servers] == ["n1:b:8080"]
    assert [s.name for s in web.other_servers] == ["n1:a:8080", "n2:a:8080"]
    tcp = render(load_template(None), backends, regs, ctx("tcp"))
    assert "cookie" not in tcp and "use_backend" not in tcp and "be_web_always" not in tcp


def test_a_canary_s_header_or_cookie_needs_a_reload_its_weights_do_not() -> None:
    regs = [reg("web", "n1:a:8080", "10.0.0.5", 8080, "v1"),
            reg("web", "n1:b:8080", "10.0.0.6", 8081, "v2")]
    plain = build_backends(WEB, regs)
    live = fresh_layout(plain)
    assert plan_runtime(live, build_backends(WEB, regs, {"web": Canary("v2", 10)})) is not None
    for canary in (Canary("v2", 10, header="X-C"), Canary("v2", 10, sticky=True)):
        wanted = build_backends(WEB, regs, {"web": canary})
        assert plan_runtime(live, wanted) is None  # a reload at the canary's start ...
        assert plan_runtime(fresh_layout(wanted), plain) is None  # ... and at its end
        steps = build_backends(WEB, regs, {"web": canary._replace(percent=50)})
        assert plan_runtime(fresh_layout(wanted), steps) is not None  # steps: runtime API
    # with a header, a server joining a side changes the rendered backends: a reload
    header = {"web": Canary("v2", 10, header="X-C")}
    more = [*regs, reg("web", "n2:b:8080", "10.0.0.8", 8081, "v2")]
    assert plan_runtime(fresh_layout(build_backends(WEB, regs, header)),
                        build_backends(WEB, more, header)) is None
def test_builtin_template_http_golden_logs_each_request_to_the_router() -> None:
    regs = [reg("web", "n1:a:8080", "10.0.0.5", 8080, "v1")]
    text = render(load_template(None), build_backends(WEB, regs), regs, ctx("http"))
    golden("haproxy-http-logged.cfg", text)
    assert "log /run/haproxy-log.sock format raw local0" in text
    assert 'log-format "%pid %b %s %Tr %ST"' in text
    tcp = render(load_template(None), build_backends(WEB, regs), regs, ctx("tcp"))
    assert "log" not in tcp.replace("log_", "")  # latency is http mode's only


def test_builtin_template_spare_slots_and_hostile_names_golden() -> None:
    hostile = ["a b:1", "x\nserver evil 1.2.3.4:80", "_spare1", "é:2", "{{x}}"]
    regs = [reg("web", f"n1:{name}", "10.0.0.5", 1000 + i) for i, name in enumerate(hostile)]
    regs += [reg("web", f"n1:c{i}:8080", "10.0.0.7", 2000 + i) for i in range(MIN_SPARES + 3)]
    text = render(load_template(None), build_backends(WEB, regs), regs, ctx("tcp"))
    golden("haproxy-spares-hostile.cfg", text)
    assert f"server-template _spare 1-{MIN_SPARES + 3 + len(hostile)} " in text


def test_every_golden_config_passes_haproxy_check(tmp_path: Path) -> None:
    import shutil
    import subprocess

    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        pytest.fail("haproxy missing: run `make setup`", pytrace=False)
    for path in sorted(GOLDEN.glob("haproxy-*.cfg")):
        text = path.read_text().replace("/run/haproxy-stats.sock", str(tmp_path / "s.sock"))
        copy = tmp_path / path.name
        copy.write_text(text)
        done = subprocess.run([haproxy, "-c", "-f", str(copy)], capture_output=True, text=True)
        assert done.returncode == 0, f"{path.name}: {done.stderr}"


# --- weights ---------------------------------------------------------------------------------


def share(servers: list[Server], weights: dict[str, int], version: str) -> float:
    total = sum(weights.values())
    return sum(weights[s.name] for s in servers if s.version == version) / total


@pytest.mark.parametrize("percent", [1, 10, 50, 90, 99])
@pytest.mark.parametrize(("ours", "others"), [(1, 1), (1, 3), (3, 1), (3, 3), (2, 7)])
def test_weights_give_the_canary_its_share(percent: int, ours: int, others: int) -> None:
    servers = ([Server(f"n:c{i}:1", "10.0.0.1", i + 1, f"n:c{i}:1", "v2") for i in range(ours)]
               + [Server(f"n:o{i}:1", "10.0.0.1", 100 + i, f"n:o{i}:1", "v1")
                  for i in range(others)])
    weights = server_weights(servers, Canary("v2", percent))
    assert all(1 <= w <= 256 for w in weights.values())
    assert share(servers, weights, "v2") == pytest.approx(percent / 100, abs=0.01)
    assert len({weights[s.name] for s in servers if s.version == "v2"}) == 1  # even


def test_no_canary_or_one_side_only_weighs_every_server_the_same() -> None:
    servers = [Server("a", "10.0.0.1", 1, "a", "v1"), Server("b", "10.0.0.1", 2, "b", "v1")]
    assert set(server_weights(servers, None).values()) == {DEFAULT_WEIGHT}
    assert set(server_weights(servers, Canary("v2", 10)).values()) == {DEFAULT_WEIGHT}
    assert set(server_weights(servers, Canary("v1", 10)).values()) == {DEFAULT_WEIGHT}


def test_rendering_is_deterministic() -> None:
    regs = [reg("web", f"n1:c{i}:8080", port=1000 + i) for i in range(5)]
    a = render(load_template(None), build_backends(WEB, regs), regs, ctx())
    b = render(load_template(None), build_backends(WEB, list(reversed(regs))), regs, ctx())
    assert a == b


def test_operator_template_sees_backends_services_and_mode(tmp_path: Path) -> None:
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


def test_broken_templates_raise_template_error(tmp_path: Path) -> None:
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


# --- hostile input cannot shape the config --------------------------------------------------

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                          st.text(max_size=40))
_hostile_values = st.one_of(
    st.text(max_size=80),
    st.fixed_dictionaries({"host": _json_scalars, "port": _json_scalars}).map(json.dumps),
    st.fixed_dictionaries({"host": st.sampled_from(["10.0.0.1", "::1", "10.0.0.1\nbind :1"]),
                           "port": st.integers(-5, 70000)}).map(json.dumps),
)


@functools.cache
def builtin_and_empty() -> tuple[jinja2.Template, frozenset[str]]:
    """The built-in template and the lines of its config without a server, made once: compiling
    the template is most of an example's time, and neither changes between examples."""
    template = load_template(None)
    empty = render(template, build_backends(WEB, []), [], ctx())
    return template, frozenset(empty.splitlines())


@settings(max_examples=examples(300), deadline=None)
@given(instance=st.text(min_size=1, max_size=60), raw=_hostile_values)
def test_hostile_keys_and_values_never_add_config_lines(instance: str, raw: str) -> None:
    template, empty = builtin_and_empty()
    parsed = parse_registration(PREFIX, f"{PREFIX}/web/{instance}", raw)
    regs = [parsed] if isinstance(parsed, Routed) else []
    text = render(template, build_backends(WEB, regs), regs, ctx())
    extra = [line for line in text.splitlines() if line not in empty]
    assert len(extra) == len(regs)
    for line in extra:
        assert re.fullmatch(r"    server [A-Za-z0-9][A-Za-z0-9._:-]* \S+:\d{1,5}", line), line


# --- haproxy_process helpers ----------------------------------------------------------------


def test_sockets_go_next_to_the_config_unless_the_path_is_too_long(tmp_path: Path) -> None:
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


def test_check_interval_sets_the_check_timings() -> None:
    regs = [reg("web", "n1:a:8080", "10.0.0.5", 32768)]
    default = render(load_template(None), build_backends(WEB, regs), regs, ctx("tcp"))
    assert "check inter 500ms fastinter 200ms downinter 1s " in default
    slow = render(load_template(None), build_backends(WEB, regs), regs,
                  dataclasses.replace(ctx("tcp"), check_interval=10))
    assert "check inter 10s fastinter 200ms downinter 20s " in slow
    assert slow.replace("inter 10s", "inter 500ms").replace("downinter 20s", "downinter 1s") \
        == default
    fast = dataclasses.replace(ctx("tcp"), check_interval=0.15)
    assert "inter 150ms fastinter 150ms downinter 300ms" in render(
        load_template(None), build_backends(WEB, regs), regs, fast)


def test_spare_slots_fixed_whatever_the_servers() -> None:
    regs = [reg("web", f"n1:c{i}:8080", "10.0.0.7", 2000 + i) for i in range(40)]
    (auto,) = build_backends(WEB, regs)
    (fixed,) = build_backends(WEB, regs, spare_slots=4)
    assert (auto.spares, fixed.spares) == (40, 4)
    text = render(load_template(None), (fixed,), regs, ctx("tcp"))
    assert "server-template _spare 1-4 " in text
