"""attention_impl="auto": the per-backend default, and its fallback for unsupported shapes."""

import pytest

from models import attention, get_config


def test_auto_is_the_reference_on_cpu():
    cfg = get_config("tiny-llama")
    assert cfg.attention_impl == "auto"
    assert attention.resolve_attention_impl(cfg, page_size=16) == "reference"


def test_auto_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    monkeypatch.setitem(attention.AUTO_ATTENTION, "cpu", "pallas")
    cfg = get_config("tiny-llama")  # head dim 16
    assert attention.resolve_attention_impl(cfg, page_size=16) == "pallas"
    assert attention.resolve_attention_impl(cfg, page_size=4) == "reference"
    assert attention.resolve_attention_impl(cfg.replace(head_dim=24), 16) == "reference"
    explicit = cfg.replace(attention_impl="reference")
    assert attention.resolve_attention_impl(explicit, page_size=16) == "reference"


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl must be"):
        get_config("tiny-gpt", attention_impl="flash")


def test_the_step_runs_what_auto_resolves_to(monkeypatch):
    import jax

    from models import init_kv_cache, init_params, pack_batch
    from models.decoder import forward

    cfg = get_config("tiny-gpt")
    params = init_params(cfg)
    batch = pack_batch([([1, 2, 3], 0, [1])], page_size=16, num_tokens=16, num_reqs=8, max_blocks=4)
    trace = lambda: str(jax.make_jaxpr(forward, static_argnums=3)(params, cache, batch, cfg))
    cache = init_kv_cache(cfg, 4, 16)
    assert "ragged_paged_attention_bq" not in trace()  # the name of the kernel's pallas_call
    monkeypatch.setitem(attention.AUTO_ATTENTION, "cpu", "pallas")
    jax.clear_caches()  # the layer body's trace is cached; the table is read at trace time
    assert "ragged_paged_attention_bq" in trace()
