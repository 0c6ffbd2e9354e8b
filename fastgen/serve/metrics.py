"""Prometheus metrics of one server (its own registry, so several apps in one process never share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("finished", "failed", "aborted", "disconnected", "invalid", "queue_full", "unauthorized",
            "too_large")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fastgen_requests", "Generation requests by outcome", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:  # present from the start, so a scrape always shows every series
            self.requests.labels(outcome)
        self.queue_depth = Gauge("fastgen_queue_depth", "Requests accepted and waiting for a slot",
                                 registry=self.registry)
        self.running = Gauge("fastgen_running_slots", "Requests decoding in a slot", registry=self.registry)
        self.audio_seconds = Counter("fastgen_audio_seconds", "Seconds of audio generated (finished requests)",
                                     registry=self.registry)
        self.time_to_first_audio = Histogram("fastgen_time_to_first_audio_seconds",
                                             "From acceptance to the first audio bytes ready to send",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("fastgen_request_latency_seconds", "From acceptance to the last audio byte",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
