"""A running HAProxy as data: runtime-API plans, the decision, HAProxy's own outputs parsed,
traffic by version, and the loop's gathering of reloads (pure, plain data)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence

import pytest

from registrar.core.control import Canary
from registrar.core.gather import Gather
from registrar.core.layout import Layout
from registrar.core.store import KeyEvent, StoredKey
from registrar.haproxy.config import (
    MIN_SPARES,
    Backend,
    Routed,
    Server,
    build_backends,
    parse_registration,
)
from registrar.haproxy.router import Registrations
from registrar.haproxy.runtime import (
    OPEN_SESSIONS,
    Action,
    Decision,
    ProcInfo,
    SlotState,
    check_slots,
    decide,
    fresh_layout,
    live_from_state,
    live_model,
    model_of,
    parse_servers_state,
    parse_show_proc,
    parse_stat,
    plan_runtime,
)
from registrar.haproxy.traffic import Traffic, fell, in_flight, merge_in_flight
from registrar.settings import Bind

PREFIX = "/services"
WEB = (Bind("web", "127.0.0.1", 8080),)


def reg(instance: str, port: int, host: str = "10.0.0.5", version: str = "v1") -> Routed:
    raw = json.dumps({"host": host, "port": port, "version": version})
    parsed = parse_registration(PREFIX, f"{PREFIX}/web/{instance}", raw)
    assert isinstance(parsed, Routed)
    return parsed


# --- plans ----------------------------------------------------------------------------------


def test_servers_coming_and_going_use_spare_slots_then_freed_ones() -> None:
    a, b, c = reg("n:a:1", 1), reg("n:b:1", 2), reg("n:c:1", 3)
    live = fresh_layout(build_backends(WEB, [a]))
    plan = plan_runtime(live, build_backends(WEB, [a, b]))
    assert plan is not None
    assert plan.commands == (
        "set server be_web/_spare1 addr 10.0.0.5 port 2",
        "set server be_web/_spare1 weight 100",
        "set server be_web/_spare1 state ready",
    )
    assert plan.expect == (SlotState("be_web", "_spare1", b.server),)
    assert live_model(plan.live) == model_of(build_backends(WEB, [a, b]))

    # a leaves (maintenance, the slot freed last), c comes (the next never-used spare)
    plan2 = plan_runtime(plan.live, build_backends(WEB, [b, c]))
    assert plan2 is not None
    assert plan2.commands == (
        "set server be_web/_spare2 addr 10.0.0.5 port 3",
        "set server be_web/_spare2 weight 100",
        "set server be_web/_spare2 state ready",
        "set server be_web/n:a:1 state maint",
    )
    assert plan2.live["web"].free[-1] == "n:a:1"
    assert plan2.live["web"].slots["n:a:1"] is None
    same = plan_runtime(plan2.live, build_backends(WEB, [b, c]))
    assert same is not None and same.empty


def test_an_instance_that_moves_gets_its_slot_readdressed() -> None:
    live = fresh_layout(build_backends(WEB, [reg("n:a:1", 1)]))
    plan = plan_runtime(live, build_backends(WEB, [reg("n:a:1", 7, "10.0.0.9")]))
    assert plan is not None
    assert plan.commands == ("set server be_web/n:a:1 addr 10.0.0.9 port 7",)


def test_weights_change_through_the_runtime_api_only() -> None:
    old, new = reg("n:a:1", 1, version="v1"), reg("n:b:1", 2, version="v2")
    live = fresh_layout(build_backends(WEB, [old, new]))
    plan = plan_runtime(live, build_backends(WEB, [old, new], {"web": Canary("v2", 10)}))
    assert plan is not None
    assert plan.commands == ("set server be_web/n:a:1 weight 256",
                             "set server be_web/n:b:1 weight 28")
    back = plan_runtime(plan.live, build_backends(WEB, [old, new]))
    assert back is not None and len(back.commands) == 2


def test_a_reload_is_needed_when_slots_run_out_or_backends_change() -> None:
    regs = [reg(f"n:c{i}:1", i + 1) for i in range(MIN_SPARES + 1)]
    empty = fresh_layout(build_backends(WEB, []))
    assert plan_runtime(empty, build_backends(WEB, regs[:MIN_SPARES])) is not None
    assert plan_runtime(empty, build_backends(WEB, regs)) is None
    two = (*WEB, Bind("api", "127.0.0.1", 9090))
    assert plan_runtime(empty, build_backends(two, [])) is None


def test_decide() -> None:
    one = build_backends(WEB, [reg("n:a:1", 1)])
    two = build_backends(WEB, [reg("n:a:1", 1), reg("n:b:1", 2)])
    live = fresh_layout(one)

    def text(value: str) -> Callable[[], str]:
        return lambda: value

    def runtime_decision(backends: Sequence[Backend], changed: set[str] | None = None,
                         ) -> Decision:
        def unasked() -> str:
            raise AssertionError("the runtime API decides without the rendered text")

        return decide(backends, unasked, running=True, runtime_api=True, live=live,
                      running_text="x", changed=changed)

    assert runtime_decision(one).action is Action.NOTHING
    runtime = runtime_decision(two)
    assert runtime.action is Action.RUNTIME and runtime.plan is not None
    # only the services said to have changed are planned: the others are what `live` serves
    assert runtime_decision(two, changed=set()).action is Action.NOTHING
    assert runtime_decision(two, changed={"web"}).action is Action.RUNTIME
    many = build_backends(WEB, [reg(f"n:c{i}:1", i + 1) for i in range(MIN_SPARES + 2)])
    assert runtime_decision(many).action is Action.RELOAD
    assert decide(two, text("y"), running=True, runtime_api=True, live=None,
                  running_text="x").action is Action.RELOAD  # slots unknown
    assert decide(two, text("y"), running=False, runtime_api=True, live=live,
                  running_text="x").action is Action.INSTALL
    # an operator's template (or --reload-cmd): the text decides
    assert decide(two, text("y"), running=True, runtime_api=False, live=None,
                  running_text="y").action is Action.NOTHING
    assert decide(two, text("y"), running=True, runtime_api=False, live=None,
                  running_text="x").action is Action.RELOAD


# --- what HAProxy says ----------------------------------------------------------------------

STATE = (
    "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
    "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
    "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr "
    "srv_agent_port\n"
    "3 be_web 1 n:a:1 10.0.0.5 0 5 100 100 9 1 0 0 8 0 0 0 - 1 - 0 0 - - 0\n"
    "3 be_web 2 _spare1 10.0.0.5 2 4 100 100 0 1 0 0 8 0 0 0 - 2 - 0 0 - - 0\n"
    "3 be_web 3 _spare2 ::1 2 4 28 28 0 1 0 0 8 0 0 0 - 3 - 0 0 - - 0\n"
    "3 be_web 4 _spare3 127.0.0.1 0 5 100 100 0 1 0 0 8 0 0 0 - 1 - 0 0 - - 0\n"
)


def test_check_slots_reads_show_servers_state() -> None:
    b = Server("n:b:1", "10.0.0.5", 2, "n:b:1")
    assert check_slots(STATE, [SlotState("be_web", "n:a:1", None),
                               SlotState("be_web", "_spare1", b),
                               SlotState("be_web", "_spare2",
                                         Server("x", "::1", 3, "x", weight=28))]) == []
    problems = check_slots(STATE, [SlotState("be_web", "_spare1", None),
                                   SlotState("be_web", "n:a:1", b),
                                   SlotState("be_web", "nope", b),
                                   SlotState("be_web", "_spare2", Server("x", "::1", 3, "x"))])
    assert len(problems) == 5
    moved = check_slots(STATE, [SlotState("be_web", "_spare2", Server("x", "::2", 3, "x",
                                                                       weight=28))])
    assert moved == ["be_web/_spare2: at [::1]:3, not [::2]:3"]  # IPv6 in brackets


def test_the_slots_are_learnt_again_from_haproxy_after_a_reload_from_outside() -> None:
    """After someone else's reload the worker's slots are not what we planned: what serves
    a wanted address is kept, a stranger is taken out, free slots are reused."""
    wanted = build_backends(WEB, [reg("n:b:1", 2), reg("n:c:1", 9)])
    live = live_from_state(parse_servers_state(STATE), wanted)["web"]
    assert live.slots["n:a:1"] is None and live.slots["_spare3"] is None
    assert live.free == ("_spare3", "n:a:1")
    held = live.slots["_spare1"]
    assert held is not None and held.instance == "n:b:1"
    stranger = live.slots["_spare2"]
    assert stranger is not None and stranger.instance.startswith("?")
    plan = plan_runtime({"web": live}, wanted)
    assert plan is not None
    assert "set server be_web/_spare2 state maint" in plan.commands
    assert "set server be_web/_spare3 addr 10.0.0.5 port 9" in plan.commands


def test_show_proc_gives_reloads_failures_and_current_workers() -> None:
    text = (
        "#<PID>          <type>          <reloads>       <uptime>        <version>      \n"
        "11286           master          1 [failed: 1]   0d00h00m09s     2.6.12-1+deb12u4\n"
        "# workers\n"
        "11289           worker          1               0d00h00m09s     2.6.12-1+deb12u4\n"
        "# old workers\n"
        "11100           worker          2               0d00h01m09s     2.6.12-1+deb12u4\n"
        "# programs\n\n"
    )
    assert parse_show_proc(text) == ProcInfo(reloads=1, failed=1, workers=(11289,),
                                             old_workers=(11100,))
    assert parse_show_proc("Unknown command\n") is None


STAT_HEADER = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,"
               "eresp,wretr,wredis,status,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,"
               "hrsp_other\n")


def stat_line(server: str, stot: int, ok: int, bad: int, econ: int = 0) -> str:
    return (f"be_web,{server},0,0,0,0,,{stot},0,0,,0,,{econ},0,0,0,UP,0,{ok},0,0,{bad},0\n")


def test_show_stat_gives_each_servers_counters() -> None:
    text = STAT_HEADER + stat_line("n:a:1", 10, 8, 2, econ=1) + (
        "be_web,BACKEND,0,0,0,0,,10,0,0,,0,,1,0,0,0,UP,0,8,0,0,2,0\n")
    counters = parse_stat(text)
    assert list(counters) == [("be_web", "n:a:1")]
    assert counters[("be_web", "n:a:1")]["hrsp_5xx"] == 2
    assert counters[("be_web", "n:a:1")]["econ"] == 1
    assert parse_stat("Unknown command\n") == {}
    assert parse_stat(STAT_HEADER + "be_web,x,short\n") == {}


# --- traffic by version -----------------------------------------------------------------


def test_traffic_goes_to_whoever_served_it_and_survives_new_workers() -> None:
    traffic = Traffic("http")
    slot = ("be_web", "_spare1")
    stat = parse_stat(STAT_HEADER + stat_line("_spare1", 10, 9, 1, econ=2))
    traffic.observe(stat, {slot: ("web", "v1")})
    # the slot changes hands (v1 left, v2 took it): growth from now on is v2's
    stat = parse_stat(STAT_HEADER + stat_line("_spare1", 15, 14, 1, econ=2))
    traffic.observe(stat, {slot: ("web", "v2")})
    # a reload: the new worker starts at 0
    traffic.new_worker()
    traffic.observe(parse_stat(STAT_HEADER + stat_line("_spare1", 3, 3, 0)),
                    {slot: ("web", "v2")})
    # a restart we did not see: counters went down, all of it is new
    traffic.observe(parse_stat(STAT_HEADER + stat_line("_spare1", 1, 1, 0)),
                    {slot: ("web", "v2")})
    report = traffic.report()
    assert report["web"]["v1"] == {"2xx": 9, "3xx": 0, "4xx": 0, "5xx": 1, "other": 0,
                                   "tcp": 0, "connection_errors": 2}
    assert report["web"]["v2"]["2xx"] == 5 + 3 + 1
    assert report["web"]["v2"]["connection_errors"] == 0


def test_tcp_mode_counts_sessions() -> None:
    traffic = Traffic("tcp")
    traffic.observe(parse_stat(STAT_HEADER + stat_line("a", 7, 0, 0, econ=1)),
                    {("be_web", "a"): ("web", "v1")})
    assert traffic.report()["web"]["v1"]["tcp"] == 7
    assert traffic.report()["web"]["v1"]["connection_errors"] == 1


# --- the loop's pure pieces -------------------------------------------------------------


def test_gather_waits_for_quiet_but_never_longer_than_the_max_delay() -> None:
    g = Gather(quiet=0.1, max_delay=1.0)
    assert g.due_at() is None
    g.note(10.0)
    assert g.due_at() == pytest.approx(10.1)
    for step in range(1, 30):  # a change every 50 ms: never quiet
        g.note(10.0 + step * 0.05)
    assert g.due_at() == pytest.approx(11.0)
    g.clear()
    assert g.due_at() is None


def test_registrations_count_changes_and_rejections_once() -> None:
    rejected: list[tuple[str, str]] = []
    regs = Registrations(Layout(PREFIX, "/ctl"),
                         lambda key, why: rejected.append((key, why.reason)))
    value = json.dumps({"host": "10.0.0.5", "port": 1})
    regs.replace_all({"/services/web/a": value, "/services/web/bad": "nope"})
    assert [r.server.instance for r in regs.snapshot()[0]] == ["a"]
    assert rejected == [("/services/web/bad", "invalid_json")]
    seen = regs.version
    regs.apply([KeyEvent("/services/web/bad", "nope", 5), KeyEvent("/services/web/a", value, 5)])
    assert regs.version == seen and len(rejected) == 1  # same values: no change
    assert regs.wait_change(seen, threading.Event(), 0) == seen
    regs.replace_weights({"/ctl/weights/web": StoredKey('{"version": "v2", "percent": 10}', 0)})
    assert regs.version == seen + 1
    assert regs.snapshot()[1] == {"web": Canary("v2", 10)}
    regs.apply_weights([KeyEvent("/ctl/weights/web", None, 9)])
    assert regs.snapshot()[1] == {} and regs.version == seen + 2


# --- what the router has done: applied and in_flight -----------------------------------------


def test_registrations_say_the_revision_they_hold_and_when_nothing_changed_since() -> None:
    regs = Registrations(Layout(PREFIX, "/ctl"))
    value = json.dumps({"host": "10.0.0.5", "port": 1})
    regs.replace_all({"/services/web/a": value}, revision=7)
    assert regs.state()[2] == 7
    seen = regs.version
    assert regs.settled(seen) == 7
    # an event that changes nothing (the same value, a key not routed) still moves the revision
    regs.apply([KeyEvent("/services/web/a", value, 9)])
    assert regs.version == seen and regs.settled(seen) == 9
    regs.apply([KeyEvent("/services/web/a", None, 12)])
    assert regs.settled(seen) is None  # a change not yet applied: nothing is settled
    assert regs.settled(regs.version) == 12 and regs.state()[2] == 12


def test_in_flight_counts_open_sessions_on_instances_out_of_rotation_only() -> None:
    holders = {("be_web", "_spare1"): ("web", "n:a:80"), ("be_web", "_spare2"): ("web", "n:b:80"),
               ("be_api", "x"): ("api", "n:x:80")}
    open_now = {("be_web", "_spare1"): 2, ("be_web", "_spare2"): 3, ("be_api", "x"): 0,
                ("be_web", "_spare3"): 4}  # a slot nobody held: not an instance's
    assert in_flight(open_now, holders, {"web": {"n:b:80"}}) == {"web": {"n:a:80": 2}}
    assert in_flight(open_now, holders, {"web": {"n:a:80", "n:b:80"}}) == {}
    assert in_flight(open_now, holders, {"api": {"n:a:80"}}) == {  # another service's instance
        "web": {"n:a:80": 2, "n:b:80": 3}}
    old_worker = in_flight({("be_web", "n:a:80"): 1}, {("be_web", "n:a:80"): ("web", "n:a:80")},
                           {})
    both = merge_in_flight([{"web": {"n:a:80": 2}}, old_worker])
    assert both == {"web": {"n:a:80": 3}}
    assert not fell({"web": {"n:a:80": 3}}, {"web": {"n:a:80": 1}})  # fewer, not none
    assert fell(both, {})
    assert fell({"web": {"n:a:80": 1, "n:b:80": 1}}, {"web": {"n:b:80": 1}})


def test_show_stat_gives_open_sessions_apart_from_the_counters() -> None:
    line = "be_web,n:a:1,0,0,5,9,,10,0,0,,0,,1,0,0,0,UP,0,8,0,0,2,0\n"
    assert parse_stat(STAT_HEADER + line, OPEN_SESSIONS) == {("be_web", "n:a:1"): {"scur": 5}}
    assert "scur" not in parse_stat(STAT_HEADER + line)[("be_web", "n:a:1")]


def test_an_old_worker_keeps_its_own_readings_and_what_it_answers_late_is_counted() -> None:
    traffic = Traffic("http")
    slot = ("be_web", "n:a:80")
    owners = {slot: ("web", "v1")}
    traffic.observe(parse_stat(STAT_HEADER + stat_line("n:a:80", 10, 10, 0)), owners)
    traffic.retire(4242)  # a reload: worker 4242 goes on with a request open
    # the new worker starts at 0 ...
    traffic.observe(parse_stat(STAT_HEADER + stat_line("n:a:80", 2, 2, 0)), owners)
    # ... and the old one answers its last request: only that one is new
    traffic.observe(parse_stat(STAT_HEADER + stat_line("n:a:80", 11, 11, 0)), owners,
                    worker=4242)
    assert traffic.report()["web"]["v1"]["2xx"] == 10 + 2 + 1
    traffic.forget(4242)
    # a pid seen again after it was forgotten starts from nothing (a new process)
    traffic.observe(parse_stat(STAT_HEADER + stat_line("n:a:80", 1, 1, 0)), owners,
                    worker=4242)
    assert traffic.report()["web"]["v1"]["2xx"] == 14


def test_show_stat_can_leave_out_idle_slots() -> None:
    """A thousand backends' empty slots: nothing to count, so not read into counters."""
    text = STAT_HEADER + stat_line("n:a:1", 10, 8, 2) + stat_line("_spare1", 0, 0, 0)
    assert set(parse_stat(text)) == {("be_web", "n:a:1"), ("be_web", "_spare1")}
    assert set(parse_stat(text, skip_idle=True)) == {("be_web", "n:a:1")}
    assert parse_stat(STAT_HEADER + "be_web,short,0\n") == {}  # a cut line is no server
