"""The server's Prometheus series (GET /metrics, text format), in a registry of their own so that
several apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vptq_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("vptq_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("vptq_completion_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.latency = Histogram("vptq_request_latency_seconds", "Time from a request to its last token",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("vptq_time_to_first_token_seconds", "Time from a request to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        batch = Histogram("vptq_decode_batch_size", "Sequences in each decode pass",
                          buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        engine.on_decode = batch.observe
        Gauge("vptq_cancelled_sequences", "Sequences dropped because their client went away (since start)",
              registry=r).set_function(lambda: engine.cancelled)
        Gauge("vptq_queue_depth", "Requests waiting for a place in the batch",
              registry=r).set_function(lambda: engine.queue_depth)
        Gauge("vptq_running_sequences", "Sequences in the decoding batch",
              registry=r).set_function(lambda: engine.running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
