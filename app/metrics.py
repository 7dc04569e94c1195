"""The API layer's Prometheus metrics: what clients see (latencies, requests by status) and what the
batcher does. Names follow vLLM's where the concept is the same, under the `llmserve_` prefix
(underscores: Prometheus reserves colons for recording rules); README, "Metrics", lists them.

Each app gets its own registry, so several apps in one process (the tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds, from a fast token on a small model to a long answer on a busy server.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class ApiMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("llmserve_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llmserve_inter_token_latency_seconds",
                             "Between consecutive token deltas of one choice (a Medusa step may deliver several tokens)",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llmserve_e2e_request_latency_seconds", "From arrival to the last token of the request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("llmserve_request_queue_time_seconds",
                               "Time a request waited in the batcher before it was sent to the model server",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("llmserve_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("llmserve_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.rejected = Counter("llmserve_rejected_requests",
                                "Requests refused for capacity: queue_full (batcher), overloaded (model server), draining",
                                ["reason"], registry=r)
        self.batch_size = Histogram("llmserve_batcher_batch_size", "Requests per batch sent to the model server",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=r)
        self.window_wait = Histogram("llmserve_batcher_window_wait_seconds",
                                     "How long the oldest request of a windowed batch waited for it to fill "
                                     "(batches that left at once for free slots are not windowed)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("llmserve_num_requests_running", "Requests sent to the model server, not finished", registry=r)
        self.waiting = Gauge("llmserve_num_requests_waiting", "Requests waiting in the batcher", registry=r)
        self.backend_up = Gauge("llmserve_backend_up", "1 while a model server (replica) answers /info; 0 while it is out of rotation",
                                ["replica"], registry=r)
