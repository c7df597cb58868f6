"""Counters, gauges and histograms, and their Prometheus text exposition (format 0.0.4).

What registrar needs of prometheus_client, on the standard library: instruments with labels on a
registry owned by one process, the text `/metrics` serves, and `get_sample_value` for tests.
prometheus_client cost every process that serves metrics 12 MiB of RSS (it imports `http.server`,
`wsgiref` and `urllib.request` whether or not they are used), half the host agent's budget;
this module costs a few hundred KiB (README, "Why no gRPC and no Docker SDK").

The output is what prometheus_client wrote, less the `_created` series: a counter's family is
its name without `_total` and its sample ends in `_total`; values as Go writes them (`1.0`,
`+Inf`); label values and help escaped. The tests read it with prometheus_client's own parser.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

from registrar.typing_shim import NamedTuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0)

Labels = tuple[tuple[str, str], ...]


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


class Family(NamedTuple):
    name: str  # a counter's without `_total`, as Prometheus' text format names it
    kind: str  # "counter", "gauge" or "histogram"
    documentation: str
    samples: list[Sample]


class Registry:
    """The metrics of one process (never a global one)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def register(self, metric: _Metric) -> None:
        with self._lock:
            if metric.family in self._metrics:
                raise ValueError(f"duplicate metric: {metric.family}")
            self._metrics[metric.family] = metric

    def collect(self) -> list[Family]:
        with self._lock:
            metrics = list(self._metrics.values())
        return [metric.collect() for metric in metrics]

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one sample (`name` as exposed, e.g. with `_total` or `_bucket`)."""
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == (labels or {}):
                    return sample.value
        return None

    def render(self) -> bytes:
        """The text exposition of every metric."""
        lines: list[str] = []
        for family in self.collect():
            exposed = family.name + "_total" if family.kind == "counter" else family.name
            lines.append(f"# HELP {exposed} {_escape_help(family.documentation)}")
            lines.append(f"# TYPE {exposed} {family.kind}")
            for sample in family.samples:
                lines.append(f"{sample.name}{_labels_text(sample.labels)} {_number(sample.value)}")
        return ("\n".join(lines) + "\n").encode()


class _Child:
    """One series: an unlabelled metric's only one, or one set of label values."""

    __slots__ = ("_lock", "buckets", "sum", "value")

    def __init__(self, buckets: int = 0) -> None:
        self._lock = threading.Lock()
        self.value = 0.0
        self.buckets = [0] * buckets
        self.sum = 0.0

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)


class _Metric:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: Registry | None = None) -> None:
        self.family = name.removesuffix("_total") if self.kind == "counter" else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[Labels, _Child] = {}
        self._lock = threading.Lock()
        if not self.labelnames:
            self._children[()] = self._new_child()
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> _Child:
        return _Child()

    def _child(self, values: Sequence[str], named: dict[str, str]) -> _Child:
        if named:
            if values or set(named) != set(self.labelnames):
                raise ValueError(f"{self.family}: labels {sorted(named)} are not "
                                 f"{list(self.labelnames)}")
            values = [named[label] for label in self.labelnames]
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.family}: {len(values)} label values for "
                             f"{list(self.labelnames)}")
        key = tuple(zip(self.labelnames, (str(v) for v in values), strict=True))
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def _only(self) -> _Child:
        if self.labelnames:
            raise ValueError(f"{self.family} has labels {list(self.labelnames)}: use .labels()")
        return self._children[()]

    def _series(self) -> list[tuple[Labels, _Child]]:
        with self._lock:
            return list(self._children.items())

    def _samples(self, labels: Labels, child: _Child) -> Iterable[Sample]:
        yield Sample(self.family, dict(labels), child.value)

    def collect(self) -> Family:
        samples = [s for labels, child in self._series() for s in self._samples(labels, child)]
        return Family(self.family, self.kind, self.documentation, samples)


class CounterChild:
    __slots__ = ("_child",)

    def __init__(self, child: _Child) -> None:
        self._child = child

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._child.inc(amount)


class Counter(_Metric):
    kind = "counter"

    def labels(self, *values: str, **named: str) -> CounterChild:
        return CounterChild(self._child(values, named))

    def inc(self, amount: float = 1) -> None:
        CounterChild(self._only()).inc(amount)

    def _samples(self, labels: Labels, child: _Child) -> Iterable[Sample]:
        yield Sample(self.family + "_total", dict(labels), child.value)


class GaugeChild:
    __slots__ = ("_child",)

    def __init__(self, child: _Child) -> None:
        self._child = child

    def inc(self, amount: float = 1) -> None:
        self._child.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._child.inc(-amount)

    def set(self, value: float) -> None:
        self._child.set(value)


class Gauge(_Metric):
    kind = "gauge"

    def labels(self, *values: str, **named: str) -> GaugeChild:
        return GaugeChild(self._child(values, named))

    def inc(self, amount: float = 1) -> None:
        self._only().inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._only().inc(-amount)

    def set(self, value: float) -> None:
        self._only().set(value)


class HistogramChild:
    __slots__ = ("_bounds", "_child")

    def __init__(self, child: _Child, bounds: tuple[float, ...]) -> None:
        self._child = child
        self._bounds = bounds

    def observe(self, amount: float) -> None:
        child = self._child
        with child._lock:
            child.sum += amount
            child.value += 1
            for i, bound in enumerate(self._bounds):
                if amount <= bound:
                    child.buckets[i] += 1
                    break


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: Registry | None = None, buckets: Sequence[float] = DEFAULT_BUCKETS,
                 ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> _Child:
        return _Child(len(self.bounds))

    def labels(self, *values: str, **named: str) -> HistogramChild:
        return HistogramChild(self._child(values, named), self.bounds)

    def observe(self, amount: float) -> None:
        HistogramChild(self._only(), self.bounds).observe(amount)

    def _samples(self, labels: Labels, child: _Child) -> Iterable[Sample]:
        with child._lock:
            counts, total, count = list(child.buckets), child.sum, child.value
        cumulative = 0
        for bound, n in zip(self.bounds, counts, strict=True):
            cumulative += n
            yield Sample(self.family + "_bucket", {**dict(labels), "le": _number(bound)},
                         float(cumulative))
        yield Sample(self.family + "_count", dict(labels), count)
        yield Sample(self.family + "_sum", dict(labels), total)


def _number(value: float) -> str:
    """A value as Go's strconv writes it, which is what Prometheus reads (`1.0`, `+Inf`)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _labels_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape_value(value)}"' for name, value in sorted(labels.items()))
    return "{" + inner + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
