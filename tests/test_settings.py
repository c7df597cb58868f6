"""parse_settings and the CLI's exit status 2: defaults, precedence, every validation error."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registrar import __version__
from registrar.cli import main, read_files
from registrar.settings import (
    AgentSettings,
    EtcdEndpoint,
    ListSettings,
    Settings,
    SettingsError,
    parse_settings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing of the outer environment leaks into main(); the host name is fixed."""
    for name in list(os.environ):
        if name.startswith("REGISTRAR_") or name in ("COREOS_PRIVATE_IPV4", "DOCKER_HOST"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(socket, "gethostname", lambda: "core-01")
    yield


def parse(*argv: str, **env: str) -> Settings:
    """The settings, and the files they name read (the TLS files, the template), as `main`."""
    return read_files(parse_settings(list(argv), env, socket.gethostname()))


def agent(s: Settings) -> AgentSettings:
    assert s.agent is not None
    return s.agent


def listing(s: Settings) -> ListSettings:
    assert s.ls is not None
    return s.ls


def error(*argv: str, **env: str) -> str:
    with pytest.raises(SettingsError) as info:
        read_files(parse_settings(list(argv), env, socket.gethostname()))
    return str(info.value)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate and its unencrypted key (also usable as the CA)."""
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=etcd"],
        check=True, capture_output=True,
    )
    return {"cert": cert, "key": key}


# --- defaults -----------------------------------------------------------------------------


def test_watch_defaults() -> None:
    s = parse("watch")
    assert s.command == "watch"
    assert s.etcd.endpoints == (EtcdEndpoint("127.0.0.1", 2379, False),)
    assert (s.etcd.ca, s.etcd.cert, s.etcd.key, s.etcd.user, s.etcd.password) == (None,) * 5
    assert s.prefix == "/services"
    assert s.control_prefix == "/registrar"
    assert s.ttl == 15
    assert s.host_ip is None
    assert s.node == "core-01"
    assert s.docker_url == "unix:///var/run/docker.sock"
    assert s.metrics_addr is not None  # the host agent serves /metrics by default
    assert s.drain == 0
    assert s.resync == 30
    assert agent(s).explicit is False
    assert (s.log_format, s.log_level) == ("text", "info")


def test_register_defaults_metrics_off() -> None:
    s = parse("register", "web-1")
    assert s.command == "register"
    assert agent(s).container == "web-1"
    assert s.metrics_addr is None  # sidecars share the host network: no fixed port
    assert agent(s).wait == 60
    s = parse("register", "web-1", "--metrics-addr", "127.0.0.1:9500", "--wait", "5")
    assert s.metrics_addr == ("127.0.0.1", 9500)
    assert agent(s).wait == 5


def test_ls_service_and_json() -> None:
    s = parse("ls")
    assert listing(s).service is None and listing(s).json is False
    s = parse("ls", "web", "--json")
    assert listing(s).service == "web" and listing(s).json is True


# --- precedence: flag > REGISTRAR_* > default ----------------------------------------------

Getter = Callable[[Settings], Any]
PRECEDENCE: list[tuple[str, str, str, Getter, Any, Any, Any]] = [
    # flag, flag value, env value, getter, from flag, from env, default
    ("--ttl", "5", "7", lambda s: s.ttl, 5, 7, 15),
    ("--prefix", "/a", "/b", lambda s: s.prefix, "/a", "/b", "/services"),
    ("--control-prefix", "/ctl-a", "/ctl-b", lambda s: s.control_prefix,
     "/ctl-a", "/ctl-b", "/registrar"),
    ("--node", "n1", "n2", lambda s: s.node, "n1", "n2", "core-01"),
    ("--resync", "0", "10", lambda s: s.resync, 0, 10, 30),
    ("--drain", "1.5", "2", lambda s: s.drain, 1.5, 2.0, 0.0),
    ("--etcd", "http://e1:2379", "https://e2:2380,https://e3", lambda s: s.etcd.endpoints,
     (EtcdEndpoint("e1", 2379, False),),
     (EtcdEndpoint("e2", 2380, True), EtcdEndpoint("e3", 2379, True)),
     (EtcdEndpoint("127.0.0.1", 2379, False),)),
    ("--metrics-addr", "127.0.0.1:9000", "0.0.0.0:9100", lambda s: s.metrics_addr,
     ("127.0.0.1", 9000), ("0.0.0.0", 9100), ("0.0.0.0", 9477)),
    ("--log-format", "json", "text", lambda s: s.log_format, "json", "text", "text"),
    ("--log-level", "debug", "warning", lambda s: s.log_level, "debug", "warning", "info"),
    ("--docker", "tcp://d1:2375", "unix:///x.sock", lambda s: s.docker_url,
     "tcp://d1:2375", "unix:///x.sock", "unix:///var/run/docker.sock"),
    ("--host-ip", "10.0.0.1", "10.0.0.2", lambda s: s.host_ip, "10.0.0.1", "10.0.0.2", None),
    ("--etcd-user", "alice", "bob", lambda s: s.etcd.user, "alice", "bob", None),
]


@pytest.mark.parametrize(
    ("flag", "flag_value", "env_value", "get", "from_flag", "from_env", "default"),
    PRECEDENCE, ids=[row[0] for row in PRECEDENCE],
)
def test_precedence(
    flag: str, flag_value: str, env_value: str, get: Getter, from_flag: Any, from_env: Any,
    default: Any,
) -> None:
    env_name = "REGISTRAR_" + flag.lstrip("-").replace("-", "_").upper()
    extra = {"REGISTRAR_ETCD_PASSWORD": "pw"} if flag == "--etcd-user" else {}
    assert get(parse("watch", flag, flag_value, **{env_name: env_value}, **extra)) == from_flag
    assert get(parse("watch", **{env_name: env_value}, **extra)) == from_env
    assert get(parse("watch")) == default


def test_explicit_flag_env_default() -> None:
    assert agent(parse("watch", "--explicit", REGISTRAR_EXPLICIT="false")).explicit is True
    assert agent(parse("watch", REGISTRAR_EXPLICIT="yes")).explicit is True
    assert agent(parse("watch", REGISTRAR_EXPLICIT="0")).explicit is False
    assert agent(parse("watch")).explicit is False
    assert "--explicit" in error("watch", REGISTRAR_EXPLICIT="maybe")


def test_env_values_are_validated_like_flags() -> None:
    assert "--ttl" in error("watch", REGISTRAR_TTL="1")
    assert "--etcd" in error("watch", REGISTRAR_ETCD="ftp://x")
    assert "--node" in error("watch", REGISTRAR_NODE="a/b")


# --- validation: every error names its flag ------------------------------------------------


@pytest.mark.parametrize("ttl", ["1", "0", "-3", "2.5", "abc", "", " ", "1e3", "²"])
def test_bad_ttl(ttl: str) -> None:
    assert "--ttl" in error("watch", "--ttl", ttl)


def test_smallest_ttl() -> None:
    assert parse("watch", "--ttl", "2").ttl == 2


@pytest.mark.parametrize(
    "urls",
    [
        "ftp://x", "x:2379", "127.0.0.1:2379", "http://", "https://:2379", "http://a:99999",
        "http://a:port", "http://a:2379/v3", "http://a?x=1", "http://user:pw@a:2379",
        "http://a:2379,ftp://b", "http://a:2379,,http://b", "http://a:2379,b:2379",
        "unix:///var/run/etcd.sock", "", " ",
    ],
)
def test_bad_etcd(urls: str) -> None:
    assert "--etcd" in error("watch", "--etcd", urls)


def test_etcd_endpoints() -> None:
    s = parse("watch", "--etcd", "https://a:2379, http://[::1]:4001 ,http://b/")
    assert s.etcd.endpoints == (
        EtcdEndpoint("a", 2379, True), EtcdEndpoint("::1", 4001, False),
        EtcdEndpoint("b", 2379, False),
    )
    assert str(s.etcd.endpoints[1]) == "http://[::1]:4001"


@pytest.mark.parametrize("prefix", ["services", "/", "//", "", "/a b", "/a/../b", "/a//b", "/é"])
def test_bad_prefix(prefix: str) -> None:
    assert "--prefix" in error("watch", "--prefix", prefix)
    assert "--control-prefix" in error("watch", "--control-prefix", prefix)


def test_trailing_slash_is_dropped() -> None:
    assert parse("watch", "--prefix", "/services/").prefix == "/services"


@pytest.mark.parametrize(
    ("prefix", "control"),
    [("/services", "/services/ctl"), ("/registrar/x", "/registrar"), ("/x", "/x"),
     ("/a/b", "/a"), ("/a", "/a/b/c")],
)
def test_prefixes_must_not_contain_each_other(prefix: str, control: str) -> None:
    message = error("watch", "--prefix", prefix, "--control-prefix", control)
    assert "--control-prefix" in message and "--prefix" in message


def test_sibling_prefixes_are_fine() -> None:
    s = parse("watch", "--prefix", "/services", "--control-prefix", "/services-ctl")
    assert (s.prefix, s.control_prefix) == ("/services", "/services-ctl")


@pytest.mark.parametrize("flag", ["--etcd-ca", "--etcd-cert", "--etcd-key"])
def test_unreadable_tls_file(flag: str, tmp_path: Path, tls_files: dict[str, Path]) -> None:
    missing = str(tmp_path / "missing.pem")
    pair = {"--etcd-cert": str(tls_files["cert"]), "--etcd-key": str(tls_files["key"])}
    args = ["watch", "--etcd", "https://e:2379"]
    for name, path in pair.items():
        args += [name, missing if name == flag else path]
    if flag == "--etcd-ca":
        args += ["--etcd-ca", missing]
    assert flag in error(*args)
    args[args.index(missing)] = str(tmp_path)  # a directory is not readable as a file
    assert flag in error(*args)


def test_readable_tls_files_pass(tls_files: dict[str, Path]) -> None:
    cert, key = str(tls_files["cert"]), str(tls_files["key"])
    s = parse("watch", "--etcd", "https://e:2379", "--etcd-ca", cert, "--etcd-cert", cert,
              "--etcd-key", key)
    assert (s.etcd.ca, s.etcd.cert, s.etcd.key) == (cert, cert, key)
    s = parse("watch", "--etcd", "https://e:2379", REGISTRAR_ETCD_CA=cert)
    assert s.etcd.ca == cert


def test_cert_without_key_and_key_without_cert(tls_files: dict[str, Path]) -> None:
    cert, key = str(tls_files["cert"]), str(tls_files["key"])
    assert "--etcd-key" in error("watch", "--etcd", "https://e:2379", "--etcd-cert", cert)
    assert "--etcd-cert" in error("watch", "--etcd", "https://e:2379", "--etcd-key", key)


def test_user_without_password_and_password_without_user() -> None:
    assert "--etcd-user" in error("watch", "--etcd-user", "alice")
    message = error("watch", REGISTRAR_ETCD_PASSWORD="secret")
    assert "--etcd-user" in message or "--etcd-password" in message
    assert "secret" not in message
    s = parse("watch", "--etcd-user", "alice", REGISTRAR_ETCD_PASSWORD="secret")
    assert (s.etcd.user, s.etcd.password) == ("alice", "secret")


def test_password_is_not_in_repr() -> None:
    s = parse("watch", "--etcd-user", "alice", "--etcd-password", "hunter2-secret")
    assert s.etcd.password == "hunter2-secret"
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in str(s)
    assert "hunter2-secret" not in repr(s.etcd)


@pytest.mark.parametrize(
    "addr",
    ["9477", "host", "host:", "host:abc", "host:70000", "host:-1", "a b:80", "host:²",
     "::1", "user@host:80", "", " "],
)
def test_bad_metrics_addr(addr: str) -> None:
    assert "--metrics-addr" in error("watch", "--metrics-addr", addr)


@pytest.mark.parametrize(
    ("addr", "expected"),
    [("127.0.0.1:0", None), (":0", None), ("0.0.0.0:0", None), (":9000", ("0.0.0.0", 9000)),
     ("[::1]:9000", ("::1", 9000)), ("localhost:9477", ("localhost", 9477))],
)
def test_metrics_addr(addr: str, expected: tuple[str, int] | None) -> None:
    assert parse("watch", "--metrics-addr", addr).metrics_addr == expected


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "", "²"])
def test_bad_resync(value: str) -> None:
    assert "--resync" in error("watch", "--resync", value)


@pytest.mark.parametrize("value", ["-1", "-0.5", "abc", "inf", "nan", ""])
def test_bad_drain(value: str) -> None:
    assert "--drain" in error("watch", "--drain", value)


def test_drain_and_resync_values() -> None:
    s = parse("watch", "--drain", "0.5", "--resync", "0")
    assert (s.drain, s.resync) == (0.5, 0)


@pytest.mark.parametrize(("flag", "value"), [("--log-format", "xml"), ("--log-format", ""),
                                             ("--log-level", "loud")])
def test_bad_log_settings(flag: str, value: str) -> None:
    assert flag in error("watch", flag, value)


def test_log_format_is_case_insensitive() -> None:
    assert parse("watch", "--log-format", "JSON").log_format == "json"


@pytest.mark.parametrize(
    "node", ["a/b", "a:b", "..", ".x", "-x", "x" * 129, "nöde", "a b", "a\nb", "\x1b[31m"]
)
def test_bad_node(node: str) -> None:
    assert "--node" in error("watch", "--node", node)


def test_longest_node() -> None:
    assert parse("watch", "--node", "x" * 128).node == "x" * 128


def test_host_ip_sources() -> None:
    assert parse("watch", COREOS_PRIVATE_IPV4="10.1.2.3").host_ip == "10.1.2.3"
    assert parse("watch", "--host-ip", "10.9.9.9", COREOS_PRIVATE_IPV4="10.1.2.3").host_ip == (
        "10.9.9.9"
    )
    assert parse("watch", REGISTRAR_HOST_IP="10.8.8.8", COREOS_PRIVATE_IPV4="10.1.2.3").host_ip \
        == "10.8.8.8"
    assert parse("watch").host_ip is None
    assert "--host-ip" in error("watch", "--host-ip", "not-an-ip")
    assert "--host-ip" in error("watch", COREOS_PRIVATE_IPV4="300.1.2.3")


def test_docker_host() -> None:
    assert parse("watch", DOCKER_HOST="tcp://docker:2375").docker_url == "tcp://docker:2375"
    assert parse("watch", REGISTRAR_DOCKER="unix:///r.sock",
                 DOCKER_HOST="tcp://docker:2375").docker_url == "unix:///r.sock"
    assert parse("watch", "--docker", "unix:///f.sock", REGISTRAR_DOCKER="unix:///r.sock",
                 DOCKER_HOST="tcp://docker:2375").docker_url == "unix:///f.sock"


def test_register_needs_a_container() -> None:
    assert "CONTAINER" in error("register", "")
    error("register")


def test_unknown_flag_and_command() -> None:
    assert "--bogus" in error("watch", "--bogus")
    assert "--ttl" in error("watch", "--ttl")  # flag without its value
    error()
    error("bogus")


# --- the CLI: exit 2, one line on stderr naming the flag ----------------------------------


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["watch", "--ttl", "1"], "--ttl"),
        (["watch", "--etcd", "ftp://x"], "--etcd"),
        (["watch", "--bogus"], "--bogus"),
        (["watch", "--prefix", "services"], "--prefix"),
        (["watch", "--metrics-addr", "nope"], "--metrics-addr"),
        (["watch", "--metrics-addr", "host:²"], "--metrics-addr"),
        (["watch", "--resync", "-1"], "--resync"),
        (["watch", "--node", "a/b"], "--node"),
        (["register", "web-1", "--wait", "soon"], "--wait"),
        (["ls", "--log-format", "xml"], "--log-format"),
        (["watch", "--etcd-ca", "/nonexistent/ca.pem", "--etcd", "https://e:2379"], "--etcd-ca"),
    ],
)
def test_cli_exit_2_with_one_line(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert named in lines[0]
    assert "Traceback" not in err


def test_cli_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REGISTRAR_TTL", "1")
    assert main(["watch"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--ttl" in err


def test_cli_without_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_cli_names_an_unknown_option_before_the_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--bogus"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "--bogus" in err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert __version__ in out
    assert out.strip() == f"registrar {__version__}"


def test_common_flags_may_come_before_the_command() -> None:
    settings = parse_settings(["--ttl", "9", "watch", "--prefix", "/p"], {})
    assert (settings.ttl, settings.prefix) == (9, "/p")
    assert parse_settings(["--ttl", "9", "watch", "--ttl", "4"], {}).ttl == 4


def test_an_empty_value_counts_as_not_given() -> None:
    # ... for flags whose default is "none" or worked out; elsewhere it is an error.
    env = {"REGISTRAR_HOST_IP": "10.1.2.3", "REGISTRAR_NODE": ""}
    settings = parse_settings(["watch", "--host-ip="], env, socket.gethostname())
    assert settings.host_ip == "10.1.2.3"
    assert settings.node == socket.gethostname()
    with pytest.raises(SettingsError, match="--ttl"):
        parse_settings(["watch"], {"REGISTRAR_TTL": ""})


def test_environment_of_another_command_is_not_validated() -> None:
    env = {"REGISTRAR_WAIT": "soon", "REGISTRAR_JSON": "maybe", "REGISTRAR_EXPLICIT": "kind of"}
    assert agent(parse_settings(["watch"], {**env, "REGISTRAR_EXPLICIT": "1"})).explicit
    assert listing(parse_settings(["ls"], {**env, "REGISTRAR_JSON": "yes"})).json
    with pytest.raises(SettingsError, match="--wait"):
        parse_settings(["register", "c1"], env)


# --- promote: the canary's second step ------------------------------------------------------


def test_the_latency_gate_header_and_sticky_flags() -> None:
    s = parse("promote", "web", "v2", "--canary", "10,50", "--max-p99", "250",
              "--max-latency-ratio", "1.5", "--gate", "http://127.0.0.1:9/gate",
              "--header", "X-Canary", "--sticky")
    assert s.promote is not None and s.promote.canary is not None
    c = s.promote.canary
    assert (c.max_p99_ms, c.max_latency_ratio, c.gate, c.header, c.sticky) == (
        250.0, 1.5, "http://127.0.0.1:9/gate", "X-Canary", True)
    assert c.needs_http == "--max-p99"
    plain = parse("promote", "web", "v2", "--canary", "10").promote
    assert plain is not None and plain.canary is not None
    assert plain.canary.needs_http is None and plain.canary.gate is None
    from_env = parse("promote", "web", "v2", "--canary", "10", REGISTRAR_MAX_P99="80")
    assert from_env.promote is not None and from_env.promote.canary is not None
    assert from_env.promote.canary.max_p99_ms == 80.0


@pytest.mark.parametrize(("flags", "named"), [
    (["--max-p99", "0"], "--max-p99"), (["--max-p99", "-5"], "--max-p99"),
    (["--max-p99", "fast"], "--max-p99"), (["--max-p99", "inf"], "--max-p99"),
    (["--max-p99", "nan"], "--max-p99"),
    (["--max-latency-ratio", "1"], "--max-latency-ratio"),
    (["--max-latency-ratio", "0.5"], "--max-latency-ratio"),
    (["--max-latency-ratio", "x"], "--max-latency-ratio"),
    (["--gate", "ftp://h/x"], "--gate"), (["--gate", "gate"], "--gate"),
    (["--gate", "http://"], "--gate"), (["--gate", "http://h:99999/"], "--gate"),
    (["--gate", "http://h/a b"], "--gate"),
    (["--header", "X Canary"], "--header"), (["--header", "X-Canary\n"], "--header"),
    (["--header", "_x"], "--header"), (["--header", "a" * 65], "--header"),
    (["--header", "x'y"], "--header"),
])
def test_bad_canary_flags_are_named(flags: list[str], named: str) -> None:
    message = error("promote", "web", "v2", "--canary", "10", *flags)
    assert message.startswith(f"{named}:"), message
    assert "\n" not in message


@pytest.mark.parametrize("flag", [["--max-p99", "5"], ["--max-latency-ratio", "2"],
                                  ["--gate", "http://h/"], ["--header", "X-C"], ["--sticky"]])
def test_canary_flags_need_canary(flag: list[str]) -> None:
    assert error("promote", "web", "v2", *flag).startswith(f"{flag[0]}: only with --canary")


@pytest.mark.parametrize("word", ["pause", "resume", "abort"])
def test_steering_takes_the_service_alone(word: str) -> None:
    s = parse("promote", "web", f"--{word}")
    assert s.promote is not None
    assert (s.promote.steer, s.promote.version, s.promote.canary) == (word, None, None)
    for extra in (["v2"], ["--clear"], ["--canary", "10"], ["--sticky"],
                  ["--pause" if word != "pause" else "--abort"]):
        message = error("promote", "web", *extra, f"--{word}")
        assert message.startswith("--"), message


def test_steering_is_a_flag_only() -> None:
    """No REGISTRAR_PAUSE: an action of one command is never taken from the environment."""
    s = parse("promote", "web", "v2", REGISTRAR_PAUSE="true", REGISTRAR_ABORT="1")
    assert s.promote is not None and s.promote.steer is None and s.promote.version == "v2"
    assert error("promote", "web", REGISTRAR_ABORT="1").startswith("VERSION: required")
def test_response_timeout_of_the_router() -> None:
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80").haproxy
    assert hp is not None and hp.response_timeout == 30.0
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80", "--response-timeout", "0.5").haproxy
    assert hp is not None and hp.response_timeout == 0.5
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80", REGISTRAR_RESPONSE_TIMEOUT="2").haproxy
    assert hp is not None and hp.response_timeout == 2.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(SettingsError, match="--response-timeout"):
            parse("haproxy", "--bind", "web=127.0.0.1:80", "--response-timeout", bad)


def test_bind_file_adds_binds_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "binds"
    path.write_text("# services of group a\napi=127.0.0.1:9001\n\nweb=[::1]:9002  # v6\n")
    hp = parse("haproxy", "--bind", "db=127.0.0.1:9000", "--bind-file", str(path)).haproxy
    assert hp is not None
    assert [(b.service, b.host, b.port) for b in hp.binds] == [
        ("db", "127.0.0.1", 9000), ("api", "127.0.0.1", 9001), ("web", "::1", 9002)]
    hp = parse("haproxy", REGISTRAR_BIND_FILE=str(path)).haproxy
    assert hp is not None and [b.service for b in hp.binds] == ["api", "web"]


def test_bind_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "binds"
    path.write_text("api=127.0.0.1:9001\nweb 127.0.0.1:9002\n")
    with pytest.raises(SettingsError, match=r"--bind-file .*binds line 2: must be SERVICE=ADDR"):
        parse("haproxy", "--bind-file", str(path))
    with pytest.raises(SettingsError, match="--bind-file: cannot read"):
        parse("haproxy", "--bind-file", str(tmp_path / "missing"))
    path.write_text("# nothing\n")
    with pytest.raises(SettingsError, match="give at least one"):
        parse("haproxy", "--bind-file", str(path))


def test_check_interval() -> None:
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80").haproxy
    assert hp is not None and hp.check_interval == 0.5
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80", "--check-interval", "10").haproxy
    assert hp is not None and hp.check_interval == 10
    for bad in ("0", "0.05", "4000", "x"):
        assert "--check-interval" in error("haproxy", "--bind", "web=127.0.0.1:80",
                                           "--check-interval", bad)


def test_spare_slots() -> None:
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80").haproxy
    assert hp is not None and hp.spare_slots is None
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80", "--spare-slots", "4").haproxy
    assert hp is not None and hp.spare_slots == 4
    hp = parse("haproxy", "--bind", "web=127.0.0.1:80", REGISTRAR_SPARE_SLOTS="auto").haproxy
    assert hp is not None and hp.spare_slots is None
    for bad in ("0", "-1", "x"):
        assert "--spare-slots" in error("haproxy", "--bind", "web=127.0.0.1:80",
                                        "--spare-slots", bad)


def test_an_endpoint_read_without_urllib_is_what_urlsplit_reads() -> None:
    """`--etcd` endpoints of the usual shape skip urllib.parse (a sidecar's start): on every
    one of these, accepted or refused, the two readings agree."""
    import itertools
    from urllib.parse import urlsplit

    from registrar.settings import _endpoints

    hosts = ["127.0.0.1", "localhost", "ETCD-1.Example.COM", "[::1]", "[FD00::5]",
             "[::ffff:10.0.0.1]", "a_b", "[fe80::1%25eth0]", "h..x", "-h"]
    ports = ["", ":", ":0", ":2379", ":65535", ":65536", ":00080", ":123456"]
    for scheme, host, port, tail in itertools.product(
            ["http", "https", "HTTP"], hosts, ports, ["", "/", "/x", "?q", "#f"]):
        url = f"{scheme}://{host}{port}{tail}"
        try:
            parts = urlsplit(url)
            number = parts.port
            if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query
                    or parts.path not in ("", "/") or parts.fragment):
                raise ValueError(url)
            expected: object = (parts.hostname, number or 2379, parts.scheme == "https")
        except ValueError:
            expected = "refused"
        try:
            endpoint = _endpoints(url)[0]
            got: object = (endpoint.host, endpoint.port, endpoint.secure)
        except SettingsError:
            got = "refused"
        assert got == expected, url


@given(st.ip_addresses(v=4).map(str)
       | st.lists(st.integers(0, 300), min_size=4, max_size=4).map(
           lambda octets: ".".join(str(o) for o in octets))
       | st.lists(st.sampled_from(["0", "00", "01", "010", "255", "256", "1", "99"]),
                  min_size=3, max_size=5).map(".".join)
       | st.text("0123456789.", max_size=16))
def test_a_host_ip_read_without_ipaddress_is_what_ipaddress_reads(raw: str) -> None:
    """`--host-ip`'s fast path (a plain dotted IPv4) agrees with ipaddress on what it takes."""
    import ipaddress

    from registrar import settings

    try:
        expected: str | None = str(ipaddress.ip_address(raw))
    except ValueError:
        expected = None
    if settings.PLAIN_IPV4_RE.fullmatch(raw):
        assert expected == raw
    assert (settings._ip("--host-ip", raw) if expected else None) == expected
