"""Hostile input, property-tested: what etcd holds is not ours to trust, nor are labels.

tests/test_naming.py covers `registrations_for` (any label gives a key under the prefix or a
counted rejection). This file covers the rest of the way:
- the keeper's decision (`core.reconcile.plan`), given arbitrary etcd contents, arbitrary
  containers and an arbitrary control state, never deletes a key that is not this node's and
  never writes outside `{prefix}/` and `{control}/standby/`; the keeper's thread around it
  revokes only its own lease and never fails a step;
- `ls` (`rows`, `render`, `render_promotions`) and `parse_promotions` never crash on any value,
  and a value cannot pass itself off as another key;
- settings never accept a prefix, control prefix or node that would let a key escape, and no
  value of any flag raises anything but SettingsError.
"""

from __future__ import annotations

import io
import json
import logging
import string
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from registrar.agent.lease_keeper import LeaseKeeper
from registrar.commands.listing import render, render_promotions, rows
from registrar.commands.promote import _instances
from registrar.core.containers import ContainerInfo, PortBinding
from registrar.core.control import Canary, Control, parse_control, parse_promotions, place
from registrar.core.layout import Layout, parse_key
from registrar.core.naming import MAX_VALUE_BYTES, NamingContext, registrations_for
from registrar.core.ownership import Ownership, owned_by
from registrar.core.planner import plan_changes
from registrar.core.reconcile import plan
from registrar.core.store import StoredKey
from registrar.metrics import Metrics
from registrar.settings import NAME_RE, SettingsError, parse_settings
from tests.fakes import FakeEtcd
from tests.hypothesis_profiles import examples

PREFIX = "/services"
CONTROL = "/registrar"
LAYOUT = Layout(PREFIX, CONTROL)
STANDBY = LAYOUT.standby
PROMOTED = LAYOUT.promoted
NODE = "core-01"

# --- strategies ---------------------------------------------------------------------------
ALNUM = string.ascii_letters + string.digits
# [A-Za-z0-9][A-Za-z0-9._-]{0,12}, built from its two parts: the same language as
# st.from_regex(..., fullmatch=True), drawn about three times faster.
names = st.builds(lambda head, tail: head + tail, st.sampled_from(ALNUM),
                  st.text(ALNUM + "._-", max_size=12))
texts = st.text(max_size=30)
# Nodes that look like ours: a prefix of it, it with a suffix, other case.
nodes = st.one_of(st.just(NODE), st.sampled_from(["core", "core-0", "core-011", "CORE-01",
                                                  "core-01.", "core-01-x"]), names)
ports = st.one_of(st.integers(0, 70000).map(str), st.sampled_from(["8080", "80", "x", "", "-1"]))
instances = st.one_of(
    st.builds(lambda n, c, p: f"{n}:{c}:{p}", nodes, names, ports),
    st.builds(lambda n, c, p, s: f"{n}:{c}:{p}:{s}", nodes, names, ports,
              st.sampled_from(["udp", "tcp", "UDP", "", "udp:x"])),
    st.builds(lambda t: f"{NODE}:{t}", texts),
    st.builds(lambda t: f"{NODE}{t}", texts),
    texts,
)
services = st.one_of(names, texts, st.sampled_from(["..", ".", "", "a/b", "web "]))
ours = st.builds(lambda c, p, u: f"{NODE}:{c}:{p}{u}", names, st.integers(1, 65535),
                 st.sampled_from(["", ":udp"]))
stored_keys = st.one_of(
    st.builds(lambda s, i: f"{PREFIX}/{s}/{i}", names, ours),
    st.builds(lambda s, i: f"{STANDBY}/{s}/{i}", names, ours),
    st.builds(lambda s, i: f"{PREFIX}/{s}/{i}", services, instances),
    st.builds(lambda s, i: f"{STANDBY}/{s}/{i}", services, instances),
    st.builds(lambda s: f"{PROMOTED}/{s}", services),
    st.builds(lambda t: f"{PREFIX}{t}", texts),  # /servicesX..., /services//..., /services
    st.builds(lambda t: f"{CONTROL}/{t}", texts),
    texts,
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)
value_like = st.fixed_dictionaries(
    {},
    optional={
        "service": json_values, "host": json_values, "port": json_values,
        "version": json_values, "node": json_values, "registered_at": json_values,
        "key": json_values, "at": json_values, "tags": json_values,
    },
)
stored_values = st.one_of(
    texts,
    json_values.map(json.dumps),
    value_like.map(json.dumps),
    st.binary(max_size=30).map(lambda b: b.decode("utf-8", "replace")),
    st.builds(lambda v: json.dumps({"version": v}), json_values),
)
etcd_contents = st.dictionaries(
    stored_keys, st.builds(StoredKey, stored_values, st.integers(0, 3)), max_size=12
)

label_names = st.sampled_from([
    "registrar.service", "registrar.8080.service", "registrar.80.service", "registrar.ignore",
    "registrar.version", "registrar.tags", "SERVICE_NAME", "SERVICE_8080_NAME", "SERVICE_TAGS",
    "SERVICE_IGNORE", "SERVICE_80_IGNORE",
])
label_values = st.one_of(names, texts, st.sampled_from(["../../etc", "a/b", "x" * 300, "",
                                                         "web\n", f"{NODE}:x:1"]))
labels = st.dictionaries(st.one_of(label_names, texts), label_values, max_size=5)
bindings = st.lists(
    st.builds(PortBinding, st.sampled_from([80, 8080, 53]) | st.integers(1, 65535),
              st.sampled_from(["tcp", "udp"]), st.integers(1, 65535),
              st.sampled_from(["", "0.0.0.0", "127.0.0.1"])),
    min_size=1, max_size=3,
)
container_ids = st.text(string.hexdigits, min_size=12, max_size=12)
container_infos = st.one_of(
    st.builds(
        ContainerInfo,
        id=container_ids,
        name=st.one_of(names, texts, st.sampled_from([f"{NODE}:x", "../x", "a/b"])),
        image=st.one_of(names, texts, st.builds(lambda a, b: f"{a}:{b}", texts, texts)),
        labels=labels,
        env=labels,
        ports=bindings,
    ),
    # and plain ones, that do register: so that most examples have keys to write
    st.builds(
        ContainerInfo,
        id=container_ids,
        name=names,
        image=names,
        labels=st.one_of(st.just({}), st.builds(lambda s: {"registrar.service": s}, names)),
        ports=bindings,
    ),
)


class Errors(logging.Handler):
    """Collects ERROR records (a failed keeper step is logged, not raised)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def mine(key: str, ownership: Ownership) -> bool:
    """Whether `key` is one of this keeper's keys, in rotation or on standby."""
    parsed = LAYOUT.parse(key)
    return parsed is not None and ownership.owns(parsed[1])


controls = st.builds(
    Control,
    promotions=st.dictionaries(st.one_of(names, texts), st.one_of(names, texts), max_size=3),
    canaries=st.dictionaries(names, st.builds(Canary, names, st.integers(0, 100)), max_size=2),
    held_services=st.frozensets(names, max_size=2),
    held_instances=st.frozensets(st.tuples(names, instances), max_size=2),
    held_nodes=st.frozensets(nodes, max_size=2),
)


def ownerships(containers: list[ContainerInfo]) -> st.SearchStrategy[Ownership]:
    """The agent's rule (less some containers that have their own sidecar) or a sidecar's
    (one container's keys), naming the containers of the example as often as not."""
    pool = st.one_of(names, st.sampled_from([c.name for c in containers])) if containers \
        else names
    return st.one_of(
        st.builds(Ownership, st.just(NODE), sidecars=st.frozensets(pool, max_size=2)),
        st.builds(lambda name: Ownership(NODE, container=name), pool),
    )


def desired_of(containers: list[ContainerInfo]) -> dict[str, str]:
    ctx = NamingContext(prefix=PREFIX, node=NODE, host_ip=None, default_ip="10.0.0.5")
    desired: dict[str, str] = {}
    for info in containers:
        outcome = registrations_for(info, ctx, "2015-07-20T12:00:00Z")
        for registration in outcome.registrations:
            assert len(registration.encoded()) <= MAX_VALUE_BYTES
            desired[registration.key] = registration.encoded()
    return desired


# --- the keeper's decision, driven directly -------------------------------------------------
@settings(max_examples=examples(120), deadline=None)
@given(contents=etcd_contents, containers=st.lists(container_infos, max_size=4),
       control=controls, data=st.data(), lease=st.integers(1, 4))
def test_the_decision_touches_only_this_keepers_keys(
    contents: dict[str, StoredKey], containers: list[ContainerInfo], control: Control,
    data: st.DataObject, lease: int,
) -> None:
    ownership = data.draw(ownerships(containers), label="ownership")
    desired = desired_of(containers)
    decided = plan(desired, contents, control, LAYOUT, ownership, lease)
    for key in decided.changes.deletes:
        assert key in contents and mine(key, ownership), f"deleted {key!r}"
    for key in decided.changes.puts:
        assert key.startswith((PREFIX + "/", STANDBY + "/")), f"wrote outside: {key!r}"
        assert mine(key, ownership), f"wrote a key that is not this keeper's: {key!r}"
    for key in decided.held:
        assert mine(key, ownership)
    event(f"deletes: {min(len(decided.changes.deletes), 2)}, "
          f"puts: {min(len(decided.changes.puts), 2)}")
    for key in desired:  # whatever is desired and ours ends up written, in rotation or standby
        parsed = LAYOUT.parse(key)
        if parsed is not None and ownership.owns(parsed[1]):
            assert key in decided.held or LAYOUT.twin(key) in decided.held


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents=etcd_contents, containers=st.lists(container_infos, max_size=3))
def test_the_keeper_thread_writes_what_the_decision_says_and_revokes_only_its_lease(
    contents: dict[str, StoredKey], containers: list[ContainerInfo]
) -> None:
    etcd = FakeEtcd(contents)
    ownership = Ownership(NODE)
    keeper = LeaseKeeper(etcd, ttl=3, layout=LAYOUT,
                         ownership=ownership, metrics=Metrics())
    errors = Errors()
    logging.getLogger("registrar").addHandler(errors)
    try:
        keeper.replace_all({"all": desired_of(containers)})
        keeper.start()
        assert keeper.synced.wait(5), "the keeper never synced"
        assert keeper.shutdown(time.monotonic() + 2)
    finally:
        logging.getLogger("registrar").removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
    for key in etcd.deletes:
        assert mine(key, ownership), f"deleted a key that is not this node's: {key!r}"
    for key in etcd.puts:
        assert mine(key, ownership), f"wrote a key that is not this node's: {key!r}"
    assert etcd.revoked == etcd.granted[-1:], "revoked a lease it did not grant"
    for key, item in contents.items():
        if not mine(key, ownership):
            assert etcd.kv.get(key) == item, f"another's key changed: {key!r}"


def test_the_decision_does_delete_this_nodes_stale_keys() -> None:
    """The properties above are not vacuous: stale keys of this node do go, others stay."""
    stale = {
        f"{PREFIX}/web/{NODE}:old:8080": StoredKey("x", 2),
        f"{STANDBY}/web/{NODE}:old:8081:udp": StoredKey("{", 0),
        f"{PREFIX}/web/other:old:8080": StoredKey("x", 2),
        f"{PREFIX}/web/{NODE}x:old:8080": StoredKey("x", 2),
        f"{PREFIX}/web/{NODE}:old:8080/deeper": StoredKey("x", 2),
        f"{PREFIX}-x/web/{NODE}:old:8080": StoredKey("x", 2),
        f"{PREFIX}/web/{NODE}:sidecar-app:8080": StoredKey("x", 2),
    }
    decided = plan({}, stale, Control(), LAYOUT,
                   Ownership(NODE, sidecars=frozenset({"sidecar-app"})), 7)
    assert sorted(decided.changes.deletes) == sorted(list(stale)[:2])
    sidecar = plan({}, stale, Control(), LAYOUT, Ownership(NODE, container="sidecar-app"), 7)
    assert sidecar.changes.deletes == (f"{PREFIX}/web/{NODE}:sidecar-app:8080",)


# --- the pure pieces ----------------------------------------------------------------------
@settings(max_examples=examples(50))
@given(
    desired=st.dictionaries(st.builds(lambda s, i: f"{PREFIX}/{s}/{i}", names, instances),
                            stored_values, max_size=8),
    actual=etcd_contents,
    lease=st.integers(1, 5),
)
def test_plan_changes_deletes_only_what_it_was_given(
    desired: dict[str, str], actual: dict[str, StoredKey], lease: int
) -> None:
    changes = plan_changes(desired, actual, lease)
    assert set(changes.deletes) <= set(actual) - set(desired)
    assert set(changes.puts) <= set(desired)


@settings(max_examples=examples(60))
@given(
    desired=st.dictionaries(
        st.builds(lambda s, n, c, p: f"{PREFIX}/{s}/{n}:{c}:{p}", names, nodes, names,
                  st.integers(1, 65535)),
        stored_values, max_size=8),
    promotions=st.dictionaries(st.one_of(names, texts), st.one_of(names, texts), max_size=4),
)
def test_place_keeps_every_instance_in_rotation_or_standby(
    desired: dict[str, str], promotions: dict[str, str]
) -> None:
    placed = place(desired, Control(promotions=promotions), LAYOUT)
    assert len(placed) == len(desired)
    assert sorted(placed.values()) == sorted(desired.values())
    for key in placed:
        base = PREFIX if key.startswith(PREFIX + "/") else STANDBY
        assert key.startswith(base + "/")
        parsed = parse_key(base, key)
        assert parsed is not None and f"{PREFIX}/{parsed[0]}/{parsed[1]}" in desired


@settings(max_examples=examples(50))
@given(stored=etcd_contents)
def test_parse_promotions_takes_only_direct_children(stored: dict[str, StoredKey]) -> None:
    promotions = parse_promotions(stored, LAYOUT)
    control = parse_control(stored, LAYOUT)  # and the rest of the control state never fails
    assert control.promotions == promotions
    for service, version in promotions.items():
        assert f"{PROMOTED}/{service}" in stored
        assert "/" not in service and service and isinstance(version, str) and version


@settings(max_examples=examples(100))
@given(stored=etcd_contents, service=st.one_of(st.none(), names, texts),
       promotions=st.dictionaries(names, names, max_size=3))
def test_ls_never_crashes_and_no_value_poses_as_another_key(
    stored: dict[str, StoredKey], service: str | None, promotions: dict[str, str]
) -> None:
    under = {k: v for k, v in stored.items() if k.startswith(PREFIX + "/")}
    entries = rows(PREFIX, under, service, promotions)
    assert [entry["key"] for entry in entries] == sorted(
        k for k in under
        if service is None or ((p := parse_key(PREFIX, k)) is not None and p[0] == service)
    )
    out = io.StringIO()
    render(entries, PREFIX, True, out)
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [entry["key"] for entry in entries]
    table = io.StringIO()
    render(entries, PREFIX, False, table)
    promoted = {k: v for k, v in stored.items() if k.startswith(PROMOTED + "/")}
    standby = rows(STANDBY, {k: v for k, v in stored.items() if k.startswith(STANDBY + "/")},
                   service)
    assert table.getvalue().count("\n") == 1 + len(entries)  # no forged rows
    render_promotions(promoted, standby, CONTROL, service, table)
    assert all(ch.isprintable() for ch in table.getvalue().replace("\n", ""))


DEEP = "[" * 100_000  # fits easily in an etcd value (1.5 MiB)


@pytest.mark.parametrize("where", ["ls rows", "ls promotions", "promotions", "promote"])
def test_a_deeply_nested_value_is_just_not_json(where: str) -> None:
    stored = {f"{PREFIX}/web/n:c:80": StoredKey(DEEP, 0), f"{PROMOTED}/web": StoredKey(DEEP, 0)}
    if where == "ls rows":
        assert rows(PREFIX, stored, None)[0]["invalid"]
    elif where == "ls promotions":
        render_promotions(stored, [], CONTROL, None, io.StringIO())
    elif where == "promotions":
        assert parse_promotions(stored, LAYOUT) == {}
    else:
        assert _instances(stored, PREFIX, "web") == {}


control_text = st.text(alphabet=st.characters(categories=["Cc"]), min_size=1, max_size=3)


@settings(max_examples=examples(50))
@given(field=st.sampled_from(["service", "host", "version", "node"]), evil=control_text)
def test_ls_table_prints_no_control_characters_from_values(field: str, evil: str) -> None:
    """A newline or an escape sequence in a value (anyone who can write under the prefix)
    must neither forge rows nor drive the operator's terminal."""
    value = {"service": "web", "host": "10.0.0.1", "port": 80, "version": "v1", "node": "n"}
    value[field] = f"x{evil}FORGED ROW"
    stored = {f"{PREFIX}/web/n:c:80": StoredKey(json.dumps(value), 0)}
    out = io.StringIO()
    render(rows(PREFIX, stored, None), PREFIX, False, out)
    text = out.getvalue()
    assert len(text.splitlines()) == 2
    assert not any(ch in text.replace("\n", "") for ch in map(chr, [*range(32), 127]))


# --- settings -----------------------------------------------------------------------------
def _settings(argv: list[str], env: dict[str, str]) -> Any:
    try:
        return parse_settings(argv, env)
    except SettingsError:
        return None


# argv and the environment cannot carry NUL.
any_text = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=40)
path_like = st.one_of(
    any_text,
    st.lists(st.one_of(names, st.sampled_from(["..", ".", "", " ", "a b", "x:y", "%2e"]),
                       any_text), max_size=4).map(lambda p: "/" + "/".join(p)),
    st.sampled_from(["/", "//", "/services/", "/services/..", "/services/../registrar",
                     "/services//x", "services", "/registrar", "/services-ctl"]),
    # valid paths, some nested in one another: what settings must still tell apart
    st.lists(names, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
    st.sampled_from(["/services", "/services/registrar", "/registrar", "/registrar/services",
                     "/services-ctl", "/a", "/a/b"]),
)


@settings(max_examples=examples(100))
@given(prefix=path_like, control=path_like, service=names, instance=instances)
def test_no_accepted_prefix_lets_a_key_escape(
    prefix: str, control: str, service: str, instance: str
) -> None:
    s = _settings(["watch", "--node", NODE], {"REGISTRAR_PREFIX": prefix,
                                               "REGISTRAR_CONTROL_PREFIX": control})
    event("accepted" if s is not None else "refused")
    if s is None:
        return
    for path in (s.prefix, s.control_prefix):
        assert path.startswith("/") and not path.endswith("/")
        assert all(NAME_RE.fullmatch(seg) for seg in path[1:].split("/"))
    key = f"{s.prefix}/{service}/{instance}"
    layout = Layout(s.prefix, s.control_prefix)
    standby = f"{layout.standby}/{service}/{instance}"
    promoted = f"{layout.promoted}/{service}"
    assert not key.startswith(s.control_prefix + "/")
    assert not standby.startswith(s.prefix + "/") and not promoted.startswith(s.prefix + "/")
    assert parse_key(s.prefix, key) is None or parse_key(s.prefix, key) == (service, instance)


@settings(max_examples=examples(60))
@given(node=st.one_of(any_text, nodes, st.builds(lambda n, t: n + t, nodes, any_text)))
def test_no_accepted_node_can_claim_another_nodes_keys(node: str) -> None:
    s = _settings(["watch"], {"REGISTRAR_NODE": node})
    event("accepted" if s is not None else "refused")
    if s is None:
        return
    assert NAME_RE.fullmatch(s.node)
    assert ":" not in s.node and "/" not in s.node
    assert not owned_by(s.node, f"{s.node}x:web-1:8080")
    assert not owned_by(s.node, f"x{s.node}:web-1:8080")


FLAGS = ["ETCD", "ETCD_USER", "PREFIX", "CONTROL_PREFIX", "TTL", "HOST_IP", "NODE", "DOCKER",
         "METRICS_ADDR", "DRAIN", "RESYNC", "EXPLICIT", "LOG_FORMAT", "LOG_LEVEL", "WAIT",
         "JSON"]  # not the TLS files: those are opened
SECRET = "Zq9-s3cret-Xw"


@settings(max_examples=examples(100))
@given(values=st.dictionaries(st.sampled_from(FLAGS), any_text, min_size=1, max_size=4),
       command=st.sampled_from([["watch"], ["register", "c1"], ["ls"], ["ls", "web"]]),
       user=st.sampled_from([None, "registrar"]))
def test_any_flag_value_is_accepted_or_one_settings_error(
    values: dict[str, str], command: list[str], user: str | None
) -> None:
    env = {f"REGISTRAR_{name}": value for name, value in values.items()}
    env["REGISTRAR_ETCD_PASSWORD"] = SECRET
    if user is not None:
        env.setdefault("REGISTRAR_ETCD_USER", user)
    try:
        s = parse_settings(command, env)
    except SettingsError as exc:
        assert SECRET not in str(exc)
    else:
        assert SECRET not in repr(s)
