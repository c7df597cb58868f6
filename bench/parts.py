"""The parts of `make bench` beyond the single-host table, in the order they run: each a name
(for `--only`), the heading of its section in bench/results.md and how to run it (quick or
not) to that section's markdown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench import (
    canary_bench,
    checks_bench,
    cluster_bench,
    drain_bench,
    haproxy_bench,
    scale_bench,
)
from bench.report import add_section, section_of, write_section

__all__ = ["PARTS", "Part", "add_section", "section_of", "write_section"]


@dataclass(frozen=True)
class Part:
    name: str
    heading: str
    says: str
    run: Callable[[bool], str]


PARTS = (
    Part("routing", haproxy_bench.HEADING, "registrar haproxy with a real HAProxy",
         lambda quick: haproxy_bench.section(haproxy_bench.run(quick))),
    Part("checks", checks_bench.HEADING, "what registrar's own health checks cost",
         checks_bench.run),
    Part("drain", drain_bench.HEADING, "registrar drain with two routers",
         lambda quick: drain_bench.section(drain_bench.run(quick))),
    Part("canary", canary_bench.HEADING, "promote --canary with two routers under load",
         canary_bench.run),
    Part("cluster", cluster_bench.HEADING,
         "18 hosts x 70 services x 2, two routers (bench/cluster_bench.py; needs root)",
         lambda quick: cluster_bench.section(cluster_bench.run(quick))),
    Part("scale", scale_bench.HEADING,
         "100, 300 and 1,000 simulated hosts x 10 instances, a 3-member etcd, two routers "
         "and a catalog (bench/scale_bench.py)",
         lambda quick: scale_bench.section(scale_bench.run(quick))),
)
