"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

The series counted on every request and every batch item (requests, their latency, batch sizes, queue waits,
onnxruntime time) are `LoopCounter` and `LoopHistogram`: plain numbers that only the event loop's thread
touches, with no lock, read by the registry at scrape time. prometheus_client's own take a lock per
increment and cost several times more, which at tens of thousands of messages a second is a visible share of
the event loop. The rest (gauges, rejections, expirations) are prometheus_client's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

disable_created_metrics()  # the *_created series double the output and nobody graphs them

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class CountSeries:
    """One label set's count."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class BucketSeries:
    """One label set's histogram: a count per bucket (the last one +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose upper bound holds it
        self.total += value


class LoopCounter:
    """A labelled counter for the event loop's thread only; exported as `<name>_total`."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.series: dict[tuple[str, ...], CountSeries] = {}

    def labels(self, *values: str) -> CountSeries:
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, not {values}")
            found = self.series[values] = CountSeries()
        return found

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self.series.items()):
            family.add_metric(values, series.value)
        return family


class LoopHistogram:
    """A labelled histogram for the event loop's thread only."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self.series: dict[tuple[str, ...], BucketSeries] = {}

    def labels(self, *values: str) -> BucketSeries:
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, not {values}")
            found = self.series[values] = BucketSeries(self.bounds)
        return found

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for values, series in list(self.series.items()):
            counts, running, buckets = list(series.counts), 0, []
            for le, count in zip(les, counts, strict=True):
                running += count
                buckets.append((le, float(running)))
            family.add_metric(values, buckets, series.total)
        return family


class LoopMetrics:
    """The registry's view of the loop's series, read at scrape time."""

    def __init__(self, metrics: list[LoopCounter | LoopHistogram]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            yield metric.family()


LABELLED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "WS"})


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = LoopCounter(
            "lstm_serve_requests", "HTTP requests and WebSocket messages", ["route", "method", "status"]
        )
        self.latency = LoopHistogram(
            "lstm_serve_request_duration_seconds",
            "Time to answer a request",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = LoopHistogram("lstm_serve_batch_size", "Items per onnxruntime call", ["model"], BATCH_BUCKETS)
        self.queue_wait = LoopHistogram(
            "lstm_serve_queue_wait_seconds", "Time an item waited for its batch", ["model"], LATENCY_BUCKETS
        )
        self.inference = LoopHistogram(
            "lstm_serve_inference_seconds", "onnxruntime time per batch", ["model"], LATENCY_BUCKETS
        )
        r.register(LoopMetrics([self.requests, self.latency, self.batch_size, self.queue_wait, self.inference]))
        self.active_sessions = Gauge("lstm_serve_active_sessions", "Live streaming sessions", registry=r)
        self.sessions_expired = Counter("lstm_serve_sessions_expired", "Sessions removed after their TTL", registry=r)
        self.rejected = Counter(
            "lstm_serve_rejected_requests", "Requests refused to protect the server", ["reason"], registry=r
        )
        self.queue_length = Gauge("lstm_serve_queue_length", "Items waiting for a batch", ["model"], registry=r)
        self.request_children: dict[tuple[str, str, str], tuple[CountSeries, BucketSeries]] = {}

    def request_done(self, route: str, method: str, status: str, seconds: float) -> None:
        """Count and time one request or WebSocket message; each label set's series is looked up once."""
        labels = (route, method, status)
        children = self.request_children.get(labels)
        if children is None:
            if method not in LABELLED_METHODS:  # PROPFIND, MKCOL, ...: a client's choice must not mint series
                labels = (route, "OTHER", status)
            children = self.request_children[labels] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def observer(self, model: str) -> BatchMetrics:
        return BatchMetrics(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BatchMetrics:
    """What the batcher reports about each batch, labelled with its model."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.size = metrics.batch_size.labels(model)
        self.wait = metrics.queue_wait.labels(model)
        self.run = metrics.inference.labels(model)

    def batch_done(self, size: int, queue_waits: list[float], run_seconds: float) -> None:
        self.size.observe(size)
        self.run.observe(run_seconds)
        for wait in queue_waits:
            self.wait.observe(wait)
