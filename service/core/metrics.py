"""Prometheus metrics, one registry per app (so tests can build many apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series double the output and nobody graphs them

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lstm_serve_requests", "HTTP requests and WebSocket messages", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "lstm_serve_request_duration_seconds",
            "Time to answer a request",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lstm_serve_batch_size", "Items per onnxruntime call", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "lstm_serve_queue_wait_seconds",
            "Time an item waited for its batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "lstm_serve_inference_seconds", "onnxruntime time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.active_sessions = Gauge("lstm_serve_active_sessions", "Live streaming sessions", registry=r)
        self.sessions_expired = Counter("lstm_serve_sessions_expired", "Sessions removed after their TTL", registry=r)
        self.rejected = Counter(
            "lstm_serve_rejected_requests", "Requests refused to protect the server", ["reason"], registry=r
        )
        self.queue_length = Gauge("lstm_serve_queue_length", "Items waiting for a batch", ["model"], registry=r)
        self.request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def request_done(self, route: str, method: str, status: str, seconds: float) -> None:
        """Count and time one request or WebSocket message; each label set's series is looked up once."""
        labels = (route, method, status)
        children = self.request_children.get(labels)
        if children is None:
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
