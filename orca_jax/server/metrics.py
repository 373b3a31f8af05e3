"""Prometheus metrics of the server (`GET /metrics`), named as vLLM's with `orca:` for `vllm:`.

Dashboards written for vLLM's server read these with the prefix changed. Request figures
are observed on the engine thread after every iteration (`observe`), from the timestamps the
engine keeps on each `RequestOutput`; scheduler state is read when Prometheus scrapes. Each
server has its own registry, so several apps in one process do not collide.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from orca_jax.engine.engine import Engine
from orca_jax.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServerMetrics:
    """The server's counters, gauges and histograms over one `Engine`."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine = engine
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}
        reg = dict(labelnames=["model_name"], registry=self.registry)

        def gauge(name: str, doc: str, read) -> None:
            Gauge(name, doc, **reg).labels(**label).set_function(read)

        sched = engine.scheduler
        gauge(
            "orca:num_requests_running",
            "Requests admitted (holding KV).",
            lambda: len(sched.running),
        )
        gauge("orca:num_requests_waiting", "Requests queued.", lambda: len(sched.waiting))
        gauge(
            "orca:kv_cache_usage_perc",
            "Fraction of KV blocks held by requests (0-1).",
            lambda: sched.kv_cache_manager.usage,
        )

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, **reg).labels(**label)

        self.prompt_tokens = counter("orca:prompt_tokens", "Prompt tokens of started requests.")
        self.generation_tokens = counter("orca:generation_tokens", "Tokens generated.")
        self.iterations = counter("orca:iterations", "Engine iterations that returned outputs.")
        self.preemptions = counter("orca:num_preemptions", "Requests preempted (recomputed).")
        self.prefix_queries = counter(
            "orca:prefix_cache_queries", "Tokens of starting requests looked up in the cache."
        )
        self.prefix_hits = counter(
            "orca:prefix_cache_hits", "Of those, tokens found cached (not recomputed)."
        )
        self.draft_tokens = counter(
            "orca:spec_decode_num_draft_tokens", "Speculative decoding: draft tokens verified."
        )
        self.accepted_tokens = counter(
            "orca:spec_decode_num_accepted_tokens", "Of those, drafts accepted."
        )
        self._success = Counter(
            "orca:request_success",
            "Finished requests by finish reason.",
            labelnames=["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._label = label

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, buckets=buckets, **reg).labels(**label)

        self.ttft = histogram(
            "orca:time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS
        )
        self.tpot = histogram(
            "orca:time_per_output_token_seconds",
            "Per finished request: (last - first token time) / (tokens - 1).",
            _LATENCY_BUCKETS,
        )
        self.e2e = histogram(
            "orca:e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS
        )
        self.prompt_len = histogram(
            "orca:request_prompt_tokens", "Prompt tokens per finished request.", _TOKEN_BUCKETS
        )
        self.output_len = histogram(
            "orca:request_generation_tokens", "Tokens per finished request.", _TOKEN_BUCKETS
        )
        self._seen = self._totals()
        self.registry.register(_ConfigCollector(engine, model_name))

    def observe(self, outputs: Sequence[RequestOutput]) -> None:
        """Account one iteration's outputs (engine thread; outputs are the live objects)."""
        if outputs:
            self.iterations.inc()
        totals = self._totals()
        for counter, now, before in zip(
            (
                self.preemptions,
                self.prefix_queries,
                self.prefix_hits,
                self.draft_tokens,
                self.accepted_tokens,
            ),
            totals,
            self._seen,
            strict=True,
        ):
            counter.inc(now - before)
        self._seen = totals
        generated = 0  # one increment per iteration: each takes the metric's lock
        for out in outputs:
            completion = out.outputs[0]
            new = len(completion.delta_token_ids)
            generated += new
            if new and new == len(completion.token_ids):  # the request's first tokens
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.ttft.observe(out.first_token_time - out.arrival_time)
            if not out.finished:
                continue
            self._success.labels(finished_reason=completion.finish_reason, **self._label).inc()
            self.prompt_len.observe(len(out.prompt_token_ids))
            self.output_len.observe(len(completion.token_ids))
            if out.last_token_time is not None:
                self.e2e.observe(out.last_token_time - out.arrival_time)
            if len(completion.token_ids) > 1:
                span = out.last_token_time - out.first_token_time
                self.tpot.observe(span / (len(completion.token_ids) - 1))
        self.generation_tokens.inc(generated)

    def _totals(self) -> tuple[int, ...]:
        """The engine's running totals behind the counters (preemptions, prefix tokens,
        drafts)."""
        engine, kv = self.engine, self.engine.scheduler.kv_cache_manager
        return (
            engine.num_preemptions,
            kv.num_prefix_queries,
            kv.num_prefix_hits,
            engine.num_draft_tokens,
            engine.num_accepted_tokens,
        )

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class _ConfigCollector:
    """vLLM's info gauges, read at scrape time: `cache_config_info` (value 1; the cache's
    settings as labels) and, with LoRA, `lora_requests_info` (value: the scrape's time;
    labels: the adapters running and waiting, comma-separated, and `max_lora`)."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        engine = self.engine
        sched, model = engine.scheduler.config, engine.model_config
        cache = {
            "model_name": self.model_name,
            "block_size": str(sched.block_size),
            "num_gpu_blocks": str(sched.num_blocks),
            "cache_dtype": model.kv_cache_dtype,
            "enable_prefix_caching": str(sched.enable_prefix_caching),
        }
        info = GaugeMetricFamily(
            "orca:cache_config_info", "The KV cache's settings.", labels=list(cache)
        )
        info.add_metric(list(cache.values()), 1.0)
        yield info
        if engine.loras is None:
            return
        running, waiting = engine.loras.adapter_names()
        labels = {
            "model_name": self.model_name,
            "running_lora_adapters": ",".join(running),
            "waiting_lora_adapters": ",".join(waiting),
            "max_lora": str(engine.loras.max_loras),
        }
        lora = GaugeMetricFamily(
            "orca:lora_requests_info", "LoRA adapters in use and awaited.", labels=list(labels)
        )
        lora.add_metric(list(labels.values()), time.time())
        yield lora
