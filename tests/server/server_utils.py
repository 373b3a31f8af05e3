"""What the server tests share: the question, the engine settings, expected answers."""

from prometheus_client.parser import text_string_to_metric_families

from orca_jax import SamplingParams

QUESTION = "What is the capital of France?"

ENGINE_KW = dict(
    max_batch_size=4,
    max_model_len=256,
    max_num_batched_tokens=128,
    num_kv_blocks=64,
    max_logprobs=5,
    warmup=False,
)


def offline_output(offline, prompt, **kw):
    """The same request through the offline `LLM` (same weights, no server)."""
    return offline.generate([prompt], SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


def scrape(http) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed by prometheus_client's own parser: {(sample, labels): value}."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
