"""Prometheus metrics of every service, one definition each.

Every metric is a prometheus_client metric: ``arserve serve --metrics-port
N`` exposes them over HTTP. In the Ray wiring each replica also records
them as Ray metrics (``export_to_ray``), which Ray's metrics agent on every
node serves to Prometheus (as ``ray_arserve_...``), so one scrape config
covers every replica wherever Ray placed it.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)


class Family:
    """A labelled metric: prometheus_client always, Ray metrics once exported."""

    def __init__(self, kind: str, name: str, doc: str, labels: list[str], buckets: tuple | None = None):
        self.kind, self.name, self.doc, self.labelnames, self.buckets = kind, name, doc, labels, buckets
        cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
        self.prom = cls(name, doc, labels, **({"buckets": buckets} if buckets else {}))
        self.ray = None

    def labels(self, *values: str) -> "Child":
        return Child(self, values)

    def export_to_ray(self) -> None:
        from ray.util import metrics as ray_metrics

        name = self.name.removesuffix("_total") if self.kind == "counter" else self.name  # Ray adds _total
        if self.kind == "counter":
            self.ray = ray_metrics.Counter(name, self.doc, tag_keys=tuple(self.labelnames))
        elif self.kind == "gauge":
            self.ray = ray_metrics.Gauge(name, self.doc, tag_keys=tuple(self.labelnames))
        else:
            self.ray = ray_metrics.Histogram(name, self.doc, boundaries=list(self.buckets),
                                             tag_keys=tuple(self.labelnames))


class Child:
    def __init__(self, family: Family, values: tuple[str, ...]):
        self.family = family
        self.prom = family.prom.labels(*values)
        self.tags = dict(zip(family.labelnames, values))

    def inc(self, amount: float = 1) -> None:
        self.prom.inc(amount)
        if self.family.ray is not None and amount:
            self.family.ray.inc(amount, tags=self.tags)

    def set(self, value: float) -> None:
        self.prom.set(value)
        if self.family.ray is not None:
            self.family.ray.set(value, tags=self.tags)

    def observe(self, value: float) -> None:
        self.prom.observe(value)
        if self.family.ray is not None:
            self.family.ray.observe(value, tags=self.tags)


REQUESTS = Family("counter", "arserve_requests_total", "Generation requests finished, by outcome",
                  ["model", "method", "outcome"])
REQUEST_LATENCY = Family("histogram", "arserve_request_latency_seconds", "Request arrival to last token",
                         ["model"], LATENCY_BUCKETS)
TTFT = Family("histogram", "arserve_time_to_first_token_seconds", "Request arrival to first token", ["model"],
              LATENCY_BUCKETS)
TPOT = Family("histogram", "arserve_time_per_output_token_seconds", "Decode time per output token after the first",
              ["model"], TOKEN_BUCKETS)
GENERATED = Family("counter", "arserve_generated_tokens_total", "Completion tokens", ["model"])
DRAFTED = Family("counter", "arserve_drafted_tokens_total", "Draft tokens proposed", ["model", "method"])
ACCEPTED = Family("counter", "arserve_accepted_tokens_total", "Draft tokens accepted", ["model", "method"])
RESUMED = Family("counter", "arserve_resumed_requests_total", "Requests whose backbone replica was lost and "
                 "that resumed on another", ["model"])
DRAFT_FAILURES = Family("counter", "arserve_draft_failures_total", "Rounds decoded without drafts because the "
                        "drafter failed (error) or missed draft_timeout_s (timeout): lossless, but no speedup",
                        ["model", "method", "reason"])
QUEUE_DEPTH = Family("gauge", "arserve_backbone_queue_depth", "Score calls waiting for a forward", ["model"])
BATCH_ITEMS = Family("histogram", "arserve_backbone_batch_requests", "Requests sharing one forward", ["model"],
                     (1, 2, 4, 8, 16, 32, 64))
RUN_SECONDS = Family("histogram", "arserve_backbone_forward_seconds", "Wall time of one batched run (a forward, a "
                     "draft, a head run); its sum over a window, against the window, is the share spent computing",
                     ["model"],
                     (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5))
KV_BLOCKS = Family("counter", "arserve_kv_block_lookups_total", "KV block lookups by tier that served them "
                   "(local, redis, miss, rejected)", ["tier"])
KV_BUDGET = Family("gauge", "arserve_backbone_kv_budget_tokens", "KV token positions a backbone replica may "
                   "hold for one model's requests (kv_budget_tokens)", ["model"])
KV_RESERVED = Family("gauge", "arserve_backbone_kv_reserved_tokens", "KV token positions reserved by the requests "
                     "a backbone replica holds (at most arserve_backbone_kv_budget_tokens)", ["model"])
KV_WAITING = Family("gauge", "arserve_backbone_kv_waiting_requests", "Requests waiting for KV budget", ["model"])
LEASES_EXPIRED = Family("counter", "arserve_leases_expired_total", "Per-request states freed after an idle lease "
                        "(state_lease_s): a caller died or lost its Release", ["service"])
# every Family: Ray exports these
ALL = (REQUESTS, REQUEST_LATENCY, TTFT, TPOT, GENERATED, DRAFTED, ACCEPTED, RESUMED, DRAFT_FAILURES, QUEUE_DEPTH,
       RUN_SECONDS, BATCH_ITEMS, KV_BLOCKS, KV_BUDGET, KV_RESERVED, KV_WAITING, LEASES_EXPIRED)


def export_to_ray() -> None:
    """Record every metric as a Ray metric too (call once in a Ray replica)."""
    for family in ALL:
        if family.ray is None:
            family.export_to_ray()


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on host:port (a daemon thread)."""
    start_http_server(port, addr=host)
