"""Prometheus metrics of one server, in a registry of its own (so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds: a tiny model on a loaded CPU answers in milliseconds, a 2B model's long reply takes minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pybitnet_requests",
            "API requests answered, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pybitnet_prompt_tokens", "Prompt tokens of accepted requests", registry=r
        )
        self.generation_tokens = Counter("pybitnet_generation_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("pybitnet_queue_depth", "Sequences waiting for a free slot", registry=r)
        self.running = Gauge("pybitnet_running_sequences", "Sequences in the running batch", registry=r)
        self.ttft = Histogram(
            "pybitnet_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "pybitnet_request_latency_seconds",
            "Seconds from a request's arrival to its last token (completed requests)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def watch_engine(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Read queue depth and batch size from the engine at each scrape."""
        self.queue_depth.set_function(waiting)
        self.running.set_function(running)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
