"""The event loop's lock-free series export exactly what prometheus_client's would."""

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lstm_serve.core.metrics import LATENCY_BUCKETS, LoopCounter, LoopHistogram, LoopMetrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_loop_series_render_as_prometheus_clients_own():
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference_counter = Counter("c", "a counter", ["route", "status"], registry=theirs)
    reference_histogram = Histogram("h", "a histogram", ["route"], buckets=LATENCY_BUCKETS, registry=theirs)
    counter, histogram = (
        LoopCounter("c", "a counter", ["route", "status"]),
        LoopHistogram("h", "a histogram", ["route"], LATENCY_BUCKETS),
    )
    ours.register(LoopMetrics([counter, histogram]))
    # values on, under, between and over the bucket bounds, and at zero
    observed = [0.0, 0.0005, 0.0004, 0.0011, 0.02, 0.05, 0.3, 10.0, 11.0, 1e9]
    for k, value in enumerate(observed):
        route = "a" if k % 3 else "b"
        for c in (reference_counter, counter):
            c.labels(route, str(200 + k % 2)).inc()
        for h in (reference_histogram, histogram):
            h.labels(route).observe(value)
    assert samples(generate_latest(ours)) == samples(generate_latest(theirs))


def test_a_wrong_number_of_labels_is_refused():
    with pytest.raises(ValueError, match="takes labels"):
        LoopCounter("c", "a counter", ["route"]).labels("a", "b")
