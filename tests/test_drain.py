"""Draining one container (pure): the entry, who holds it, when the routers are done."""

from __future__ import annotations

import json
import time

import pytest

from registrar.commands.promote import Instance, Rotation
from registrar.core.control import Control, describe_changes, parse_control, place, subject
from registrar.core.drain import (
    Report,
    Run,
    entry_value,
    parse_drain,
    parse_report,
    reports,
    still_waiting,
    unversioned,
)
from registrar.core.layout import Layout
from registrar.core.ownership import Ownership
from registrar.core.reconcile import Happened, instance_keys, mine, plan
from registrar.core.store import StoredKey
from registrar.router_wait import wait_for_routers
from registrar.settings import SettingsError, parse_settings

LAYOUT = Layout("/s", "/ctl")
NODE = "n1"
LEASE = 7
RUN = Run("web-1", "c" * 64, "2026-12-04T20:00:00.1Z")


def value(version: str = "v1") -> str:
    return json.dumps({"service": "web", "version": version})


DESIRED = {"/s/web/n1:web-1:8080": value(), "/s/web/n1:web-2:8080": value(),
           "/s/api/n1:web-1:9090": value()}


def control_with(entries: dict[str, StoredKey]) -> Control:
    return parse_control(entries, LAYOUT)


def fresh(container: str = "web-1", node: str = NODE, lease: int = 99) -> dict[str, StoredKey]:
    return {LAYOUT.drain_key(node, container): StoredKey(entry_value("2026-12-04T20:00:01Z"),
                                                        lease)}


# --- the entry and the control state ------------------------------------------------------


def test_the_key_is_parsed_and_names_that_break_the_rule_are_not() -> None:
    assert LAYOUT.drain_key("n1", "web-1") == "/ctl/draining/n1/web-1"
    assert LAYOUT.parse_drain("/ctl/draining/n1/web-1") == ("n1", "web-1")
    for bad in ("/ctl/draining/n1", "/ctl/draining/n1/a/b", "/ctl/draining/n1/..",
                "/ctl/draining/-x/web-1", "/ctl/drainingx/n1/web-1"):
        assert LAYOUT.parse_drain(bad) is None, bad


def test_a_drain_holds_every_instance_of_its_container_out_like_maintenance() -> None:
    control = control_with(fresh())
    assert control.drained("n1:web-1:8080") and not control.drained("n1:web-2:8080")
    assert not control.in_rotation("web", "n1:web-1:8080", "v1")
    assert place(DESIRED, control, LAYOUT) == {
        "/ctl/standby/web/n1:web-1:8080": value(),
        "/s/web/n1:web-2:8080": value(),
        "/ctl/standby/api/n1:web-1:9090": value(),  # every port of the container
    }
    # on another node, the same container name is another container
    assert not control_with(fresh(node="n2")).drained("n1:web-1:8080")


def test_subject_and_describe_changes_know_drains() -> None:
    assert subject("/ctl/draining/n1/web-1", LAYOUT) == (None, "n1")
    assert describe_changes(Control(), control_with(fresh())) == ["drain of n1/web-1"]
    assert describe_changes(control_with(fresh()), Control()) == ["drain of n1/web-1 lifted"]


def test_the_value_says_which_run_once_taken_over() -> None:
    assert json.loads(entry_value("T")) == {"at": "T"}
    taken = entry_value("T", RUN)
    assert json.loads(taken) == {"at": "T", "container_id": RUN.container_id,
                                 "started_at": RUN.started_at}
    drain = parse_drain("web-1", StoredKey(taken, 1))
    assert drain.run == RUN and drain.holds(RUN)
    assert not drain.holds(Run("web-1", RUN.container_id, "2026-12-04T21:00:00Z"))  # restarted
    assert not drain.holds(Run("web-1", "d" * 64, RUN.started_at))  # another container
    assert parse_drain("web-1", StoredKey("not json", 1)).run is None
    assert parse_drain("web-1", StoredKey("{}", 1)).holds(RUN)  # fresh: whatever runs now


# --- the owner ----------------------------------------------------------------------------


AGENT = Ownership(NODE)


def owned_plan(control: Control, held: dict[str, StoredKey], runs: dict[str, Run],
               ownership: Ownership = AGENT
               ) -> tuple[dict[str, str], tuple[str, ...], list[Happened]]:
    decided = plan(DESIRED, held, control, LAYOUT, ownership, LEASE, runs=runs)
    return dict(decided.changes.puts), decided.changes.deletes, [n.happened for n in
                                                                  decided.notes]


def in_rotation() -> dict[str, StoredKey]:
    return {k: StoredKey(v, LEASE) for k, v in DESIRED.items()}


def test_the_owner_moves_the_instances_out_and_takes_the_entry_over_in_one_write() -> None:
    stored = fresh()
    held = {**in_rotation(), **mine(stored, LAYOUT, Ownership(NODE))}
    puts, deletes, notes = owned_plan(control_with(stored), held, {"web-1": RUN})
    key = LAYOUT.drain_key(NODE, "web-1")
    assert puts == {"/ctl/standby/web/n1:web-1:8080": value(),
                    "/ctl/standby/api/n1:web-1:9090": value(),
                    key: entry_value("2026-12-04T20:00:01Z", RUN)}  # same `at`, with its run
    assert set(deletes) == {"/s/web/n1:web-1:8080", "/s/api/n1:web-1:9090"}
    assert sorted(n.value for n in notes) == ["drain_hold", "standby", "standby"]


def test_a_held_entry_under_the_owners_lease_writes_nothing_more() -> None:
    key = LAYOUT.drain_key(NODE, "web-1")
    stored = {key: StoredKey(entry_value("T", RUN), LEASE)}
    placed = place(DESIRED, control_with(stored), LAYOUT)
    held = {**{k: StoredKey(v, LEASE) for k, v in placed.items()}, **stored}
    assert owned_plan(control_with(stored), held, {"web-1": RUN})[:2] == ({}, ())


@pytest.mark.parametrize("runs", [{}, {"web-1": Run("web-1", RUN.container_id, "later")}],
                         ids=["stopped", "started-again"])
def test_the_hold_ends_when_the_run_ends_and_the_owner_deletes_the_entry(
    runs: dict[str, Run]
) -> None:
    key = LAYOUT.drain_key(NODE, "web-1")
    stored = {key: StoredKey(entry_value("T", RUN), LEASE)}
    placed = place(DESIRED, control_with(stored), LAYOUT)
    held = {**{k: StoredKey(v, LEASE) for k, v in placed.items()}, **stored}
    puts, deletes, notes = owned_plan(control_with(stored), held, runs)
    assert key in deletes and key not in puts
    assert "/s/web/n1:web-1:8080" in puts  # back (here `desired` still has it)
    assert Happened.DRAIN_END in notes


def test_an_owner_leaves_the_entries_of_containers_it_does_not_own_alone() -> None:
    stored = {**fresh(), **fresh("web-2"), **fresh(node="n2")}
    sidecar = Ownership(NODE, container="web-1")
    assert set(mine(stored, LAYOUT, sidecar)) == {LAYOUT.drain_key(NODE, "web-1")}
    agent = Ownership(NODE, sidecars=frozenset({"web-1"}))
    assert set(mine(stored, LAYOUT, agent)) == {LAYOUT.drain_key(NODE, "web-2")}
    # the agent does not hold out what a sidecar owns, nor delete its entry
    held = {**in_rotation(), **mine(stored, LAYOUT, agent)}
    puts, deletes, _ = owned_plan(control_with(stored), held, {"web-2": RUN}, agent)
    assert LAYOUT.drain_key(NODE, "web-1") not in (*puts, *deletes)
    assert "/s/web/n1:web-1:8080" not in deletes


def test_a_keepers_counts_leave_its_drain_entries_out() -> None:
    held = {**in_rotation(), **fresh()}
    assert set(instance_keys(held, LAYOUT)) == set(DESIRED)


# --- the routers --------------------------------------------------------------------------


def report(node: str, applied: object, in_flight: object = None) -> tuple[str, StoredKey]:
    body: dict[str, object] = {"at": "T", "services": {}}
    if applied is not None:
        body["applied"] = applied
    if in_flight is not None:
        body["in_flight"] = in_flight
    return f"/ctl/routers/{node}", StoredKey(json.dumps(body), 5)


INSTANCES = [("web", "n1:web-1:8080")]


def test_reports_are_read_as_the_spec_writes_them() -> None:
    found = reports(dict([report("r1", 12, {"web": {"n1:web-1:8080": 2, "x": 0}}),
                          report("r2", None), ("/ctl/routers/a/b", StoredKey("{}", 1))]),
                    "/ctl/routers")
    assert found == [Report("r1", 12, {"web": {"n1:web-1:8080": 2}}), Report("r2", None)]
    assert parse_report("r", '{"applied": "40"}').applied == 40  # a revision as a string
    assert parse_report("r", '{"applied": true}').applied is None
    assert parse_report("r", "[1]") == Report("r", None)


def test_a_router_is_done_once_it_applied_the_removal_with_nothing_in_flight() -> None:
    behind, busy, idle = Report("a", 9), Report("b", 10, {"web": {"n1:web-1:8080": 3}}), \
        Report("c", 11, {"web": {"n1:web-2:8080": 5}})  # in flight on another instance
    assert still_waiting([behind, busy, idle], 10, INSTANCES) == {
        "a": "applied 9 < 10", "b": "3 in flight"}
    assert still_waiting([idle], 10, INSTANCES) == {}
    # nothing left the prefix now (all held out already): only what is in flight counts
    assert still_waiting([behind, busy], None, INSTANCES) == {"b": "3 in flight"}


def test_a_report_without_applied_is_not_waited_for_but_named() -> None:
    old = Report("old", None, {"web": {"n1:web-1:8080": 3}})
    assert still_waiting([old], 10, INSTANCES) == {}
    assert unversioned([old, Report("new", 10)]) == ["old"]


# --- the command's settings ---------------------------------------------------------------


def test_drain_settings() -> None:
    s = parse_settings(["drain", "web-1"], {"REGISTRAR_NODE": "agent-node"}, "host-1")
    assert s.drain_cmd is not None
    assert (s.drain_cmd.container, s.drain_cmd.node, s.drain_cmd.timeout, s.drain_cmd.undo) == (
        "web-1", "host-1", 30.0, False)  # --node is a flag only: not REGISTRAR_NODE
    s = parse_settings(["drain", "web-1", "--node", "n2", "--timeout", "5", "--undo"], {})
    assert s.drain_cmd is not None
    assert (s.drain_cmd.node, s.drain_cmd.timeout, s.drain_cmd.undo) == ("n2", 5.0, True)


@pytest.mark.parametrize("argv", [["drain", "a/b"], ["drain", ".."], ["drain", "web-1", "--node",
                                  "bad node"], ["drain"], ["drain", "web", "--timeout", "-1"]])
def test_bad_drain_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SettingsError):
        parse_settings(argv, {}, "host-1")


def test_a_promotion_does_not_wait_for_instances_a_drain_or_maintenance_holds_out() -> None:
    v2 = {"n1:a:1": Instance("n1:a:1", "v2", "h:1")}
    drained = {"n1:b:1": Instance("n1:b:1", "v2", "h:2")}
    assert not Rotation(v2, drained).settled("v2")
    assert Rotation(v2, drained, held=frozenset(drained)).settled("v2")
    assert Rotation(v2, drained, held=frozenset(drained)).settled(None)  # --clear
    assert Rotation(v2, drained, held=frozenset(drained)).count("v2") == 2  # still registered


# --- the loop around it (router_wait), with reports given in turn -------------------------


def test_wait_for_routers_ends_as_soon_as_they_are_done() -> None:
    turns = iter([[Report("r1", 9)], [Report("r1", 10, {"web": {"n1:web-1:8080": 1}})],
                  [Report("r1", 11)]])
    waited = wait_for_routers(lambda: next(turns), 10, INSTANCES, time.monotonic() + 5)
    assert waited.done and waited.routers == ["r1"] and waited.seconds < 1


def test_wait_for_routers_gives_up_at_the_deadline_naming_who_it_waited_for() -> None:
    waited = wait_for_routers(lambda: [Report("r1", 9), Report("old", None)], 10, INSTANCES,
                              time.monotonic() + 0.2)
    assert not waited.done and waited.waiting == {"r1": "applied 9 < 10"}
    assert waited.unversioned == ["old"]


def test_with_no_router_saying_what_it_applied_only_a_command_is_done() -> None:
    quick = wait_for_routers(lambda: [Report("old", None)], 10, INSTANCES,
                             time.monotonic() + 5, vacuous=True)
    assert quick.done and quick.seconds < 1
    # an agent's SIGTERM drain: nothing confirms it, so it waits the whole --drain
    started = time.monotonic()
    blind = wait_for_routers(lambda: [], 10, INSTANCES, started + 0.3)
    assert not blind.done and time.monotonic() - started >= 0.3


def test_a_promotions_rotation_is_one_read_and_its_polls_may_be_serializable() -> None:
    """`read_rotation`: the service's two sides and what holds instances out, one transaction
    (one request per poll, at 1,000 hosts eight commands poll at once)."""
    from registrar.commands.oneshot import OneShot
    from registrar.commands.promote import read_rotation
    from tests.fakes import FakeEtcd

    fake = FakeEtcd({"/s/web/n1:web-1:8080": StoredKey(value("v1"), 0),
                     f"{LAYOUT.standby}/web/n1:web-2:8080": StoredKey(value("v2"), 0),
                     **fresh("web-2")})  # web-2 drained: held out
    settings = parse_settings(["promote", "web", "v2", "--prefix", "/s",
                               "--control-prefix", "/ctl"], {})
    reads = fake.reads
    rotation = read_rotation(OneShot(fake, 5), settings, "web", serializable=True)
    assert (fake.reads - reads, fake.serializable_reads) == (1, 1)
    assert list(rotation.active) == ["n1:web-1:8080"] and list(rotation.standby) == [
        "n1:web-2:8080"]
    assert rotation.held == {"n1:web-2:8080"} and rotation.settled("v1")
