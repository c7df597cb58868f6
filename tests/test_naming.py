"""registrations_for: names, keys and values of a container's registrations (pure).

Labels and environment are hostile input: nothing they hold may produce a key outside
`{prefix}/{service}/{node}:{container}:{port}[:udp]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registrar.core.checks import CheckSpec, http_request
from registrar.core.containers import parse_inspect
from registrar.core.layout import parse_key
from registrar.core.naming import (
    MAX_VALUE_BYTES,
    NamingContext,
    Outcome,
    image_base,
    image_tag,
    instance_id,
    registrations_for,
)
from registrar.core.ownership import owned_by
from tests.hypothesis_profiles import examples
from tests.inspect_data import CONTAINER_ID, inspect_doc, published

PREFIX = "/services"
NODE = "core-01"
DEFAULT_IP = "10.0.0.5"
NOW = "2015-07-20T12:00:00Z"
SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VALUE_FIELDS = {
    "service", "host", "port", "node", "container_id", "container_name", "private_port",
    "protocol", "image", "version", "tags", "registered_at",
}


def ctx(host_ip: str | None = None, explicit: bool = False, sidecar: bool = False,
        prefix: str = PREFIX) -> NamingContext:
    return NamingContext(prefix=prefix, node=NODE, host_ip=host_ip, default_ip=DEFAULT_IP,
                         explicit=explicit, sidecar=sidecar)


def outcome(context: NamingContext | None = None, /, **doc: Any) -> Outcome:
    return registrations_for(parse_inspect(inspect_doc(**doc)), context or ctx(), NOW)


def by_key(result: Outcome) -> dict[str, dict[str, Any]]:
    assert result.rejected is None, (result.rejected, result.detail)
    return {r.key: dict(r.value) for r in result.registrations}


def services(result: Outcome) -> dict[int, str]:
    return {r.value["private_port"]: r.service for r in result.registrations}


# --- the value --------------------------------------------------------------------------


def test_value_has_exactly_the_spec_fields() -> None:
    result = outcome(labels={"registrar.service": "web", "registrar.tags": "blue"})
    assert by_key(result) == {
        f"{PREFIX}/web/{NODE}:web-1:8080": {
            "service": "web",
            "host": DEFAULT_IP,
            "port": 32768,
            "node": NODE,
            "container_id": CONTAINER_ID,
            "container_name": "web-1",
            "private_port": 8080,
            "protocol": "tcp",
            "image": "example/web:abc123",
            "version": "abc123",
            "tags": ["blue"],
            "registered_at": NOW,
        }
    }
    registration = result.registrations[0]
    assert registration.service == "web"
    assert registration.instance == f"{NODE}:web-1:8080"
    assert json.loads(registration.encoded()) == dict(registration.value)
    assert isinstance(registration.value["port"], int)


def test_udp_key_suffix_and_protocol() -> None:
    result = outcome(labels={"registrar.service": "dns"},
                     ports={"53/udp": published(5353), "53/tcp": published(5354)})
    values = by_key(result)
    assert set(values) == {f"{PREFIX}/dns/{NODE}:web-1:53:udp", f"{PREFIX}/dns/{NODE}:web-1:53"}
    assert values[f"{PREFIX}/dns/{NODE}:web-1:53:udp"]["protocol"] == "udp"
    assert values[f"{PREFIX}/dns/{NODE}:web-1:53:udp"]["port"] == 5353
    assert values[f"{PREFIX}/dns/{NODE}:web-1:53"]["protocol"] == "tcp"
    assert instance_id("n", "c", 53, "udp") == "n:c:53:udp"
    assert instance_id("n", "c", 53, "tcp") == "n:c:53"


def test_sctp_ports_are_not_registered_so_keys_stay_unique() -> None:
    # Only udp has a key suffix, and nothing routes SCTP: such ports are skipped.
    result = outcome(labels={"registrar.service": "sig"},
                     ports={"80/tcp": published(32768), "80/sctp": published(32769)})
    assert [r.key for r in result.registrations] == [f"{PREFIX}/sig/{NODE}:web-1:80"]


# --- host and port ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "host_ip", "expected"),
    [
        ("192.168.1.9", "0.0.0.0", "192.168.1.9"),  # --host-ip / $COREOS_PRIVATE_IPV4 first
        ("192.168.1.9", "10.1.2.3", "192.168.1.9"),
        (None, "10.1.2.3", "10.1.2.3"),  # then the port's own specific HostIp
        (None, "0.0.0.0", DEFAULT_IP),  # then the host's primary IPv4
        (None, "::", DEFAULT_IP),
        (None, "", DEFAULT_IP),
    ],
)
def test_host_ip_order(flag: str | None, host_ip: str, expected: str) -> None:
    ports = {"8080/tcp": [{"HostIp": host_ip, "HostPort": "32768"}]}
    result = outcome(ctx(host_ip=flag), labels={"registrar.service": "web"}, ports=ports)
    (value,) = by_key(result).values()
    assert value["host"] == expected
    assert value["port"] == 32768


def test_host_network_registers_exposed_ports_at_the_host_ip() -> None:
    doc = {"network": "host", "ports": {}, "exposed": ["8080/tcp", "5353/udp"],
           "labels": {"registrar.service": "web"}}
    values = by_key(outcome(**doc))
    assert values[f"{PREFIX}/web/{NODE}:web-1:8080"]["host"] == DEFAULT_IP
    assert values[f"{PREFIX}/web/{NODE}:web-1:8080"]["port"] == 8080
    assert values[f"{PREFIX}/web/{NODE}:web-1:5353:udp"]["port"] == 5353
    values = by_key(outcome(ctx(host_ip="192.168.1.9"), **doc))
    assert {v["host"] for v in values.values()} == {"192.168.1.9"}


def test_no_published_port_is_skipped() -> None:
    result = outcome(labels={"registrar.service": "web"}, ports={"8080/tcp": None})
    assert result.registrations == () and result.rejected is None
    assert result.skipped
    result = outcome(network="host", ports={}, exposed=[])
    assert result.registrations == () and result.skipped


# --- service names ----------------------------------------------------------------------

TWO_PORTS = {"8080/tcp": published(32768), "9090/tcp": published(32769)}


def test_image_default_name_single_port() -> None:
    assert services(outcome(image="example/web:abc123")) == {8080: "web"}


def test_image_default_name_with_port_suffix_for_several_ports() -> None:
    result = outcome(image="registry:5000/team/web:abc", ports=TWO_PORTS)
    assert services(result) == {8080: "web-8080", 9090: "web-9090"}


def test_registrar_service_names_every_port() -> None:
    result = outcome(labels={"registrar.service": "shop"}, ports=TWO_PORTS)
    assert services(result) == {8080: "shop", 9090: "shop"}


def test_per_port_label_wins_over_registrar_service() -> None:
    result = outcome(labels={"registrar.service": "shop", "registrar.9090.service": "metrics"},
                     ports=TWO_PORTS)
    assert services(result) == {8080: "shop", 9090: "metrics"}


@pytest.mark.parametrize("where", ["labels", "env"])
def test_registrator_names(where: str) -> None:
    names = {"SERVICE_NAME": "shop", "SERVICE_9090_NAME": "metrics"}
    result = outcome(ports=TWO_PORTS, **{where: names})
    assert services(result) == {8080: "shop", 9090: "metrics"}


@pytest.mark.parametrize("where", ["labels", "env"])
def test_registrar_labels_win_over_registrator(where: str) -> None:
    registrator = {"SERVICE_NAME": "old", "SERVICE_8080_NAME": "older", "SERVICE_TAGS": "x,y"}

    def with_registrator(labels: dict[str, str]) -> Outcome:
        if where == "labels":
            return outcome(labels={**registrator, **labels})
        return outcome(labels=labels, env=registrator)

    result = with_registrator({"registrar.service": "new", "registrar.tags": "blue"})
    assert services(result) == {8080: "new"}
    assert result.registrations[0].value["tags"] == ["blue"]
    # a per-port registrar label wins over a per-port registrator name too
    assert services(with_registrator({"registrar.8080.service": "new"})) == {8080: "new"}
    assert services(with_registrator({})) == {8080: "older"}


def test_registrator_label_wins_over_registrator_env() -> None:
    result = outcome(labels={"SERVICE_NAME": "from-label"}, env={"SERVICE_NAME": "from-env"})
    assert services(result) == {8080: "from-label"}


def test_tags_from_registrator() -> None:
    result = outcome(labels={"registrar.service": "web"}, env={"SERVICE_TAGS": "a, b,,c"})
    assert result.registrations[0].value["tags"] == ["a", "b", "c"]
    assert outcome().registrations[0].value["tags"] == []


@pytest.mark.parametrize(
    ("labels", "env"),
    [
        ({"registrar.ignore": "true"}, {}),
        ({"registrar.ignore": "1"}, {}),
        ({"registrar.ignore": "TRUE"}, {}),
        ({"SERVICE_IGNORE": "true"}, {}),
        ({}, {"SERVICE_IGNORE": "1"}),
        ({"registrar.service": "web", "registrar.ignore": "yes"}, {}),
    ],
)
def test_ignored(labels: dict[str, str], env: dict[str, str]) -> None:
    result = outcome(labels=labels, env=env)
    assert result.registrations == () and result.rejected is None
    assert result.skipped


def test_registrar_ignore_false_is_not_ignored() -> None:
    assert services(outcome(labels={"registrar.ignore": "false"})) == {8080: "web"}


def test_registrar_ignore_false_wins_over_service_ignore() -> None:
    """"The registrar.* labels win": an explicit registrar.ignore=false beats SERVICE_IGNORE."""
    result = outcome(labels={"registrar.ignore": "false"}, env={"SERVICE_IGNORE": "1"})
    assert services(result) == {8080: "web"}


def test_service_port_ignore() -> None:
    result = outcome(ports=TWO_PORTS, env={"SERVICE_9090_IGNORE": "1"})
    assert services(result) == {8080: "web-8080"}


def test_explicit_skips_unlabelled_ports() -> None:
    result = outcome(ctx(explicit=True), ports=TWO_PORTS)
    assert result.registrations == () and result.rejected is None and result.skipped
    result = outcome(ctx(explicit=True), ports=TWO_PORTS, labels={"registrar.8080.service": "a"})
    assert services(result) == {8080: "a"}
    result = outcome(ctx(explicit=True), ports=TWO_PORTS, env={"SERVICE_NAME": "b"})
    assert services(result) == {8080: "b", 9090: "b"}
    # a sidecar registers the container it was started for, label or not
    result = outcome(ctx(explicit=True, sidecar=True))
    assert services(result) == {8080: "web"}


# --- versions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "base", "tag"),
    [
        ("example/web:abc123", "web", "abc123"),
        ("registry:5000/team/web:abc", "web", "abc"),
        ("registry:5000/team/web", "web", "latest"),
        ("web", "web", "latest"),
        ("web:1.2.3", "web", "1.2.3"),
        ("docker.io/library/nginx:1.27-alpine", "nginx", "1.27-alpine"),
        ("web@sha256:" + "ab" * 32, "web", "ab" * 6),
        ("registry:5000/web:v2@sha256:" + "cd" * 32, "web", "v2"),
    ],
)
def test_image_base_and_tag(image: str, base: str, tag: str) -> None:
    assert image_base(image) == base
    assert image_tag(image) == tag


def test_version_label_wins_over_image_tag() -> None:
    result = outcome(image="registry:5000/team/web:abc", labels={"registrar.version": "v42"})
    assert result.registrations[0].value["version"] == "v42"
    result = outcome(image="registry:5000/team/web:abc")
    assert result.registrations[0].value["version"] == "abc"
    assert result.registrations[0].value["image"] == "registry:5000/team/web:abc"
    result = outcome(image="registry:5000/team/web")
    assert result.registrations[0].value["version"] == "latest"


# --- hostile input ----------------------------------------------------------------------

HOSTILE = [
    "../x", "..", ".", "a/b", "/web", "web/", "", " ", "web app", " web", "web\n", "web\t1",
    "web\x00", "\x1b[31mred", "x" * 1000, "x" * 129, "wéb", "服务", "web:1", "-web", ".web",
    "_web", "web%2Fx", "web\u200b", "\uff57\uff45\uff42",  # zero-width space; fullwidth "web"
]


@pytest.mark.parametrize("bad", HOSTILE)
@pytest.mark.parametrize(
    ("where", "name", "reason"),
    [
        ("labels", "registrar.service", "invalid_service_name"),
        ("labels", "registrar.8080.service", "invalid_service_name"),
        ("labels", "SERVICE_NAME", "invalid_service_name"),
        ("env", "SERVICE_8080_NAME", "invalid_service_name"),
        ("labels", "registrar.version", "invalid_version"),
    ],
)
def test_hostile_label_is_rejected_with_a_reason(
    bad: str, where: str, name: str, reason: str
) -> None:
    result = outcome(**{where: {name: bad}})
    assert result.registrations == ()
    assert result.rejected == reason
    assert result.detail


BAD_TAGS = [b for b in HOSTILE if b.strip() and not SEGMENT.fullmatch(b.strip())]


@pytest.mark.parametrize("bad", BAD_TAGS)
def test_hostile_tag_is_rejected(bad: str) -> None:
    result = outcome(labels={"registrar.tags": f"ok,{bad}"})
    assert result.registrations == ()
    assert result.rejected == "invalid_tags"


def test_too_many_tags_is_rejected() -> None:
    result = outcome(labels={"registrar.tags": ",".join(f"t{i}" for i in range(100))})
    assert result.registrations == () and result.rejected == "invalid_tags"


@pytest.mark.parametrize("bad", ["web 1", "web/1", "..", "x" * 200, "wéb"])
def test_hostile_container_name_is_rejected(bad: str) -> None:
    result = outcome(name=bad, labels={"registrar.service": "web"})
    assert result.registrations == () and result.rejected == "invalid_container_name"


@pytest.mark.parametrize("image", ["_private/_web:1", "registry:5000/.hidden", "x" * 200])
def test_image_that_gives_a_bad_name_is_rejected_unless_labelled(image: str) -> None:
    result = outcome(image=image)
    assert result.registrations == () and result.rejected == "invalid_image_name"
    assert services(outcome(image=image, labels={"registrar.service": "web"})) == {8080: "web"}


def test_one_bad_port_name_rejects_the_whole_container() -> None:
    result = outcome(ports=TWO_PORTS, labels={"registrar.service": "web",
                                              "registrar.9090.service": "../etc"})
    assert result.registrations == () and result.rejected == "invalid_service_name"


def test_huge_image_is_bounded() -> None:
    result = outcome(image="registry:5000/" + "a" * 5000 + "/web:v1",
                     labels={"registrar.service": "web"})
    for registration in result.registrations:
        assert len(registration.encoded()) <= MAX_VALUE_BYTES


# --- the property ------------------------------------------------------------------------

LABEL_NAMES = [
    "registrar.service", "registrar.8080.service", "registrar.53.service", "registrar.version",
    "registrar.tags", "registrar.ignore", "SERVICE_NAME", "SERVICE_8080_NAME", "SERVICE_53_NAME",
    "SERVICE_TAGS", "SERVICE_IGNORE", "SERVICE_8080_IGNORE",
]
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="ascii"), max_size=300),
    st.sampled_from(["web", "../x", "..", "a/b", "", " ", "x" * 1000, "web\n", "a:b", "true",
                     "false", "1", ",", "a,b", "_x", "-x", "/"]),
    st.from_regex(SEGMENT, fullmatch=True),
    st.builds(lambda a, b: a + "/" + b, st.text(max_size=10), st.text(max_size=10)),
)
good_names = st.from_regex(SEGMENT, fullmatch=True)
Strategy = st.SearchStrategy[Any]


def weighted(common: Strategy, rare: Strategy) -> Strategy:
    """Mostly `common`, so that many examples do register (hypothesis favours 0)."""
    return st.integers(0, 3).flatmap(lambda i: rare if i == 3 else common)


mostly_good = weighted(good_names, texts)
labels_st = st.dictionaries(st.one_of(st.sampled_from(LABEL_NAMES), st.text(max_size=20)),
                            mostly_good, max_size=6)
images = st.one_of(
    texts,
    st.builds(lambda name, tag: f"{name}:{tag}", good_names, good_names),
    st.builds(lambda reg, name, tag: f"{reg}/{name}:{tag}",
              st.sampled_from(["registry:5000", "docker.io/library", "r/team"]), texts, texts),
)
host_ips = st.one_of(st.sampled_from(["0.0.0.0", "::", "", "10.1.2.3", "127.0.0.1", "fe80::1"]),
                     st.text(max_size=50))
port_numbers = st.one_of(st.sampled_from([53, 80, 8080, 9090]), st.integers(1, 65535))
some_bindings = st.lists(
    st.tuples(port_numbers, st.sampled_from(["tcp", "udp", "sctp", "TCP"]),
              st.integers(1, 65535), host_ips),
    min_size=1, max_size=4,
)
bindings = weighted(some_bindings, st.just([]))


def _doc(name: str, image: str, labels: Mapping[str, str], env: Mapping[str, str],
         ports: Sequence[tuple[int, str, int, str]], host_network: bool) -> dict[str, Any]:
    spec = {f"{p}/{proto}": [{"HostIp": ip, "HostPort": str(hp)}] for p, proto, hp, ip in ports}
    doc = inspect_doc(name=name, image=image, labels=labels, env=env,
                      ports=spec, network="host" if host_network else "bridge")
    doc["Name"] = name  # as Docker gives it, with or without the "/"
    return doc


@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=weighted(good_names.map(lambda n: "/" + n), texts),
    image=images,
    labels=labels_st,
    env=labels_st,
    ports=bindings,
    host_network=st.booleans(),
    host_ip=st.sampled_from([None, "192.168.1.9"]),
    explicit=st.booleans(),
    sidecar=st.booleans(),
)
def test_property_keys_stay_in_their_place(
    name: str, image: str, labels: dict[str, str], env: dict[str, str],
    ports: list[tuple[int, str, int, str]], host_network: bool, host_ip: str | None,
    explicit: bool, sidecar: bool,
) -> None:
    info = parse_inspect(_doc(name, image, labels, env, ports, host_network))
    result = registrations_for(info, ctx(host_ip, explicit, sidecar), NOW)

    kinds = [bool(result.registrations), result.rejected is not None, result.skipped is not None]
    assert kinds.count(True) == 1, result
    if result.rejected is not None:
        assert result.rejected.strip() and result.detail.strip()
    if result.skipped is not None:
        assert result.skipped.strip()
    for registration in result.registrations:
        key = registration.key
        assert key.startswith(PREFIX + "/")
        segments = key[len(PREFIX) + 1 :].split("/")
        assert len(segments) == 2, key
        service, instance = segments
        assert SEGMENT.fullmatch(service), key
        parts = instance.split(":")
        assert len(parts) in (3, 4), key
        assert parts[0] == NODE
        assert SEGMENT.fullmatch(parts[1]), key
        assert parts[2].isascii() and parts[2].isdigit(), key
        assert len(parts) == 3 or parts[3] == "udp", key
        assert (registration.service, registration.instance) == (service, instance)
        assert parse_key(PREFIX, key) == (service, instance)
        assert owned_by(NODE, instance)
        assert not owned_by("core-02", instance)
        encoded = registration.encoded()
        assert len(encoded.encode("utf-8")) <= MAX_VALUE_BYTES
        value = json.loads(encoded)
        assert set(value) == VALUE_FIELDS
        assert value["service"] == service and value["node"] == NODE


# --- parse_key / owned_by -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (f"{PREFIX}/web/{NODE}:web-1:8080", ("web", f"{NODE}:web-1:8080")),
        (f"{PREFIX}/web/{NODE}:web-1:53:udp", ("web", f"{NODE}:web-1:53:udp")),
        (f"{PREFIX}-old/web/{NODE}:web-1:8080", None),  # another prefix that starts the same
        (f"{PREFIX}web/{NODE}:web-1:8080", None),
        (f"/other/web/{NODE}:web-1:8080", None),
        (f"{PREFIX}/web/{NODE}:web-1:8080/extra", None),
        (f"{PREFIX}/web", None),
        (f"{PREFIX}//{NODE}:web-1:8080", None),
        (f"{PREFIX}/../{NODE}:web-1:8080", None),
        (f"{PREFIX}/we b/{NODE}:web-1:8080", None),
        (PREFIX, None),
        ("", None),
    ],
)
def test_parse_key(key: str, expected: tuple[str, str] | None) -> None:
    assert parse_key(PREFIX, key) == expected


@pytest.mark.parametrize(
    ("instance", "mine"),
    [
        (f"{NODE}:web-1:8080", True),
        (f"{NODE}:web-1:53:udp", True),
        ("core-02:web-1:8080", False),
        (f"{NODE}x:web-1:8080", False),  # a node whose name starts with ours
        (f"{NODE}.lan:web-1:8080", False),
        ("core-0:web-1:8080", False),
        (f"x{NODE}:web-1:8080", False),
        (f"{NODE.upper()}:web-1:8080", False),
        (f"{NODE}:web-1:http", False),
        (f"{NODE}:web-1:8080:tcp", False),
        (f"{NODE}:web-1", False),
        (f"{NODE}", False),
        (f"{NODE}:web-1:8080:udp:x", False),
        ("", False),
    ],
)
def test_owned_by(instance: str, mine: bool) -> None:
    assert owned_by(NODE, instance) is mine


@settings(max_examples=examples(300), deadline=None)
@given(node=st.from_regex(SEGMENT, fullmatch=True), key=st.one_of(
    st.text(max_size=80),
    st.builds(lambda s, i: f"{PREFIX}/{s}/{i}", st.text(max_size=20), st.text(max_size=40)),
    st.builds(lambda n, c, p: f"{PREFIX}/web/{n}:{c}:{p}",
              st.text(max_size=20), st.text(max_size=20), st.text(max_size=6)),
))
def test_property_parse_key_never_claims_what_is_not_ours(node: str, key: str) -> None:
    parsed = parse_key(PREFIX, key)
    if parsed is None:
        return
    service, instance = parsed
    assert key == f"{PREFIX}/{service}/{instance}"
    assert SEGMENT.fullmatch(service)
    assert "/" not in instance
    if owned_by(node, instance):
        assert instance.split(":")[0] == node


# --- checks ---------------------------------------------------------------------------------


def test_registrations_carry_their_ports_check_outside_the_value() -> None:
    labels = {"registrar.service": "web", "registrar.check": "http:/health",
              "registrar.9090.check": "tcp", "registrar.check.interval": "0.5"}
    result = outcome(labels=labels, ports={**TWO_PORTS, "53/udp": published(5353)})
    checks = {(r.value["private_port"], r.value["protocol"]): r.check
              for r in result.registrations}
    assert checks == {
        (8080, "tcp"): CheckSpec("http", "/health", 0.5, 0.25, 1, 2),
        (9090, "tcp"): CheckSpec("tcp", None, 0.5, 0.25, 1, 2),
        (53, "udp"): None,  # nothing to connect to: UDP ports are registered unchecked
    }
    unchecked = outcome(labels={"registrar.service": "web"},
                        ports={**TWO_PORTS, "53/udp": published(5353)})
    assert [r.check for r in unchecked.registrations] == [None, None, None]
    # the check changes neither keys nor stored values
    assert [(r.key, r.encoded()) for r in result.registrations] == [
        (r.key, r.encoded()) for r in unchecked.registrations
    ]
    assert all(set(json.loads(r.encoded())) == VALUE_FIELDS for r in result.registrations)


@pytest.mark.parametrize(
    ("labels", "label"),
    [
        ({"registrar.check": "ping"}, "registrar.check"),
        ({"registrar.check": "http:health"}, "registrar.check"),
        ({"registrar.8080.check": "http:/a b"}, "registrar.8080.check"),
        ({"registrar.check": "tcp", "registrar.check.interval": "0.1"},
         "registrar.check.interval"),
        ({"registrar.check": "tcp", "registrar.check.timeout": "3"}, "registrar.check.timeout"),
        ({"registrar.check": "tcp", "registrar.check.rise": "0"}, "registrar.check.rise"),
        ({"registrar.check": "tcp", "registrar.check.fall": "101"}, "registrar.check.fall"),
        ({"registrar.check": "tcp", "registrar.check.fall": "nan"}, "registrar.check.fall"),
        ({"registrar.check": "tcp", "registrar.check.every": "2"}, "registrar.check.every"),
    ],
)
def test_bad_check_label_rejects_the_container(labels: dict[str, str], label: str) -> None:
    result = outcome(labels={"registrar.service": "web", **labels}, ports=TWO_PORTS)
    assert result.registrations == ()
    assert result.rejected == "invalid_check"
    assert label in result.detail


def test_check_numbers_without_a_check_are_ignored() -> None:
    result = outcome(labels={"registrar.service": "web", "registrar.check.interval": "nan"})
    assert services(result) == {8080: "web"}
    assert result.registrations[0].check is None


check_values = st.one_of(
    texts,
    st.sampled_from(["tcp", "http:/", "http:/health", "http:/a b", "http:", "2", "0.2", "0.1",
                     "1", "100", "101", "0", "nan", "inf", "-inf", "1e400", "-1", "", " ",
                     "9" * 40, "0.5", "1.5", "\x00", "http:/\r\n\r\nGET /x"]),
    st.from_regex(r"http:/[ -~]{0,30}", fullmatch=True),
)

good_kinds = st.one_of(st.just("tcp"), st.from_regex(r"http:/[a-z0-9/?=&._-]{0,20}",
                                                     fullmatch=True))
good_seconds = st.sampled_from(["0.2", "0.5", "1", "2", "2.5", "10", ".3"])
good_counts = st.integers(1, 100).map(str)
check_labels = st.fixed_dictionaries({}, optional={
    "registrar.check": weighted(good_kinds, check_values),
    "registrar.8080.check": weighted(good_kinds, check_values),
    "registrar.9090.check": weighted(good_kinds, check_values),
    "registrar.check.interval": weighted(good_seconds, check_values),
    "registrar.check.timeout": weighted(good_seconds, check_values),
    "registrar.check.rise": weighted(good_counts, check_values),
    "registrar.check.fall": weighted(good_counts, check_values),
    "registrar.check.bogus": check_values,
})


@settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(checks=check_labels, labels=labels_st, ports=some_bindings)
def test_property_hostile_check_labels_give_a_spec_or_invalid_check(
    checks: dict[str, str], labels: dict[str, str], ports: list[tuple[int, str, int, str]]
) -> None:
    info = parse_inspect(_doc("/web-1", "example/web:1", {**labels, **checks}, {}, ports, False))
    result = registrations_for(info, ctx(), NOW)  # never raises
    if result.rejected == "invalid_check":
        assert result.detail.strip() and len(result.detail) < 400
        return
    for registration in result.registrations:
        check = registration.check
        if check is None:
            continue
        assert registration.value["protocol"] == "tcp"
        assert check.kind in ("tcp", "http")
        assert 0.2 <= check.interval <= 3600 and 0 < check.timeout <= check.interval
        assert 1 <= check.rise <= 100 and 1 <= check.fall <= 100
        assert set(json.loads(registration.encoded())) == VALUE_FIELDS
        if check.path is not None:
            line = http_request("10.0.0.5", 80, check.path).split(b"\r\n")[0]
            assert re.fullmatch(rb"GET /[!-~]* HTTP/1\.0", line), line


# --- registrar.metrics ----------------------------------------------------------------------


def test_metrics_path_only_with_the_label_and_the_port_label_wins() -> None:
    assert "metrics_path" not in next(iter(by_key(outcome()).values()))
    ports = {"8080/tcp": published(32768), "9090/tcp": published(32769)}
    values = by_key(outcome(labels={"registrar.metrics": "/metrics",
                                    "registrar.9090.metrics": "/admin/prometheus"},
                            ports=ports))
    assert {v["private_port"]: v["metrics_path"] for v in values.values()} == {
        8080: "/metrics", 9090: "/admin/prometheus"}
    only_one = by_key(outcome(labels={"registrar.9090.metrics": "/m"}, ports=ports))
    assert {v["private_port"]: v.get("metrics_path") for v in only_one.values()} == {
        8080: None, 9090: "/m"}


@pytest.mark.parametrize("bad", [
    "", "metrics", "/a b", "/a?b=1", "/a#x", "/é", "/a\nb", "/" + "x" * 1024,
])
@pytest.mark.parametrize("label", ["registrar.metrics", "registrar.8080.metrics"])
def test_a_bad_metrics_path_rejects_the_container(label: str, bad: str) -> None:
    result = outcome(labels={label: bad})
    assert result.registrations == () and result.rejected == "invalid_metrics"
    assert result.detail
