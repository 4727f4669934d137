"""Prometheus metrics for GET /metrics.

Gauges and counters are read at scrape time from the engine thread's last snapshot (so a scrape
never touches the engine); the latency histograms are observed by the engine thread as it
publishes tokens. Each server has its own registry (several apps may live in one process).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineCollector:
    def __init__(self, async_engine, model_name: str):
        self.async_engine = async_engine
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        ae = self.async_engine
        snap = ae.snapshot
        c = snap.counters
        label = ["model_name"]
        name = [self.model_name]

        def gauge(metric, doc, value):
            g = GaugeMetricFamily(metric, doc, labels=label)
            g.add_metric(name, value)
            return g

        def counter(metric, doc, value):
            k = CounterMetricFamily(metric, doc, labels=label)
            k.add_metric(name, value)
            return k

        yield gauge("nudge_requests_running", "Requests scheduled in the engine.", snap.running)
        yield gauge("nudge_requests_waiting", "Requests waiting for the engine (queued or not yet scheduled).",
                    ae.num_waiting)
        yield gauge("nudge_engine_alive", "1 while the engine thread runs.", 1 if ae.alive else 0)
        free = GaugeMetricFamily("nudge_kv_blocks_free", "Free KV cache blocks per model.", labels=label + ["model"])
        total = GaugeMetricFamily("nudge_kv_blocks_total", "KV cache blocks per model.", labels=label + ["model"])
        for model, n in snap.kv_free.items():
            free.add_metric(name + [model], n)
            total.add_metric(name + [model], snap.kv_total[model])
        yield free
        yield total
        yield from _prefix_cache_metrics(snap.prefix_cache, label, name)
        tokens = CounterMetricFamily("nudge_generated_tokens", "Emitted tokens by source model.",
                                     labels=label + ["source"])
        tokens.add_metric(name + ["base"], c.get("base_tokens", 0))
        tokens.add_metric(name + ["nudger"], c.get("nudger_tokens", 0))
        yield tokens
        yield counter("nudge_handoffs", "Mode changes between base and nudger.", c.get("handoffs", 0))
        yield counter("nudge_preemptions", "Requests preempted for lack of KV blocks.", c.get("preemptions", 0))
        yield counter("nudge_rounds", "Draft-and-verify rounds (per request).", c.get("rounds", 0))
        yield counter("nudge_draft_tokens", "Tokens drafted by the nudger.", c.get("drafted_tokens", 0))
        yield counter("nudge_accepted_draft_tokens", "Drafted tokens accepted.", c.get("accepted_tokens", 0))
        yield counter("nudge_engine_steps", "Engine steps with work.", c.get("steps", 0))
        yield counter("nudge_engine_step_failures", "Engine steps that raised (in-flight requests failed).",
                      c.get("step_failures", 0))
        finished = CounterMetricFamily("nudge_requests_finished", "Finished engine requests by reason.",
                                       labels=label + ["finish_reason"])
        for key, v in sorted(c.items()):
            if key.startswith("finished_"):
                finished.add_metric(name + [key[len("finished_"):]], v)
        yield finished


def _prefix_cache_metrics(prefix_cache: dict, label: list[str], name: list[str]):
    """Prompt tokens found in each model's prefix cache, of those looked up, and the hit rate."""
    hits = CounterMetricFamily("nudge_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix "
                               "cache, per model.", labels=label + ["model"])
    queries = CounterMetricFamily("nudge_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix "
                                  "cache, per model.", labels=label + ["model"])
    rate = GaugeMetricFamily("nudge_prefix_cache_hit_rate", "Hit tokens / looked-up tokens since start, per model "
                             "(0 before any lookup).", labels=label + ["model"])
    for model, (hit, query) in prefix_cache.items():
        hits.add_metric(name + [model], hit)
        queries.add_metric(name + [model], query)
        rate.add_metric(name + [model], hit / query if query else 0.0)
    yield hits
    yield queries
    yield rate


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram("nudge_time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("nudge_inter_token_latency_seconds", "Time between consecutive tokens of a request "
                             "(a round's tokens share its time).", labels,
                             buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("nudge_request_latency_seconds", "Arrival to finish, per engine request.", labels,
                             buckets=REQUEST_BUCKETS, registry=self.registry).labels(model_name)

    def attach(self, async_engine) -> None:
        self.registry.register(_EngineCollector(async_engine, self.model_name))

    # observers called by the engine thread
    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_itl(self, seconds: float, count: int = 1) -> None:
        for _ in range(count):
            self.itl.observe(seconds)

    def observe_finish(self, reason: str | None, seconds: float) -> None:
        self.e2e.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
