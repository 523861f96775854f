"""A small Prometheus registry: counters, gauges, histograms with labels, text exposition.

Metric names start with ``edgemesh_``; counters end in ``_total``; durations are ``_seconds``
histograms. Metrics are module-level singletons, registered once at import, so every part
reports into the one registry that ``/metrics`` renders.
"""
from __future__ import annotations

import bisect
import math
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Self

DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Metric] = {}

    def labels(self, *values: str) -> Self:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = type(self)(self.name, self.doc)
            child._copy_config(self)
        return typing.cast(Self, child)

    def remove(self, *values: str) -> None:
        self._children.pop(tuple(str(v) for v in values), None)

    def _copy_config(self, parent: "_Metric") -> None:
        pass

    def render(self) -> list[str]:
        doc = self.doc.replace("\\", "\\\\").replace("\n", "\\n")
        lines = [f"# HELP {self.name} {doc}", f"# TYPE {self.name} {self.kind}"]
        if self.labelnames:
            for values, child in sorted(self._children.items()):
                lines.extend(child._samples_with(self.labelnames, values))
        else:
            lines.extend(self._samples_with((), ()))
        return lines

    def _samples_with(self, names: Sequence[str], values: Sequence[str]) -> Iterable[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, doc, labelnames)
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def _samples_with(self, names: Sequence[str], values: Sequence[str]) -> Iterable[str]:
        yield f"{self.name}{_labels(names, values)} {_num(self.value)}"


class Gauge(Counter):
    kind = "gauge"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (),
                 fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, doc, labelnames)
        self.fn = fn

    def set(self, value: float) -> None:
        self.value = value

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def _samples_with(self, names: Sequence[str], values: Sequence[str]) -> Iterable[str]:
        value = self.fn() if self.fn else self.value
        yield f"{self.name}{_labels(names, values)} {_num(value)}"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, doc, labelnames)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def _copy_config(self, parent: _Metric) -> None:
        assert isinstance(parent, Histogram)
        self.buckets = parent.buckets
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def _samples_with(self, names: Sequence[str], values: Sequence[str]) -> Iterable[str]:
        running = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            running += n
            le = 'le="' + _num(bound) + '"'
            yield f"{self.name}_bucket{_labels(names, values, le)} {running}"
        yield f"{self.name}_sum{_labels(names, values)} {_num(self.sum)}"
        yield f"{self.name}_count{_labels(names, values)} {running}"


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> _Metric:
        existing = self._metrics.get(metric.name)
        if existing is not None:
            if type(existing) is not type(metric) or existing.labelnames != metric.labelnames:
                raise ValueError(f"metric {metric.name} registered twice, differently")
            return existing
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self._metrics):
            lines.extend(self._metrics[name].render())
        return "\n".join(lines) + "\n"

    def get(self, name: str) -> _Metric | None:
        return self._metrics.get(name)


REGISTRY = Registry()


def counter(name: str, doc: str, labelnames: Sequence[str] = ()) -> Counter:
    return REGISTRY.register(Counter(name, doc, labelnames))  # type: ignore[return-value]


def gauge(name: str, doc: str, labelnames: Sequence[str] = (),
          fn: Callable[[], float] | None = None) -> Gauge:
    return REGISTRY.register(Gauge(name, doc, labelnames, fn))  # type: ignore[return-value]


def histogram(name: str, doc: str, labelnames: Sequence[str] = (),
              buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
    return REGISTRY.register(Histogram(name, doc, labelnames, buckets))  # type: ignore[return-value]
