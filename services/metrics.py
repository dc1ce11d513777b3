"""Prometheus metrics of every service (prometheus_client), one definition
each. ``arserve serve --metrics-port N`` exposes them over HTTP."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)

REQUESTS = Counter("arserve_requests_total", "Generation requests finished, by outcome",
                   ["model", "method", "outcome"])
REQUEST_LATENCY = Histogram("arserve_request_latency_seconds", "Request arrival to last token",
                            ["model"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("arserve_time_to_first_token_seconds", "Request arrival to first token", ["model"],
                 buckets=LATENCY_BUCKETS)
TPOT = Histogram("arserve_time_per_output_token_seconds", "Decode time per output token after the first",
                 ["model"], buckets=TOKEN_BUCKETS)
GENERATED = Counter("arserve_generated_tokens_total", "Completion tokens", ["model"])
DRAFTED = Counter("arserve_drafted_tokens_total", "Draft tokens proposed", ["model", "method"])
ACCEPTED = Counter("arserve_accepted_tokens_total", "Draft tokens accepted", ["model", "method"])
QUEUE_DEPTH = Gauge("arserve_backbone_queue_depth", "Score calls waiting for a forward", ["model"])
BATCH_ITEMS = Histogram("arserve_backbone_batch_requests", "Requests sharing one forward", ["model"],
                        buckets=(1, 2, 4, 8, 16, 32, 64))
KV_BLOCKS = Counter("arserve_kv_block_lookups_total", "KV block lookups by tier that served them "
                    "(local, redis, miss, rejected)", ["tier"])


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on host:port (a daemon thread)."""
    start_http_server(port, addr=host)
