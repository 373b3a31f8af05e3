"""LoRA adapters served by the engine, against transformers' Flax Llama with the adapter merged.

A random Flax Llama is written as a Hugging Face checkpoint and random PEFT adapters beside
it (`lora_utils`); the engine serves the checkpoint with the adapters in device slots. The
reference runs the same Flax model with each adapter merged into its weights (W + s B A, as
PEFT's merge_and_unload), so the engine's greedy tokens and their logprobs are checked
against an independent implementation; mixed batches, waiting for a slot, prefix caching per
adapter and the server ride on that.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from hf_reference import flax_to_torch_state_dict, random_flax_model, write_checkpoint
from lora_utils import LLAMA, LLAMA_MODULES, PEFT_PREFIX, write_peft_adapter

from models.decoder import stage_step
from orca_jax import LLM, LoRARequest, SamplingParams
from orca_jax.runner import dummy_batch
from orca_jax.utils.compilation import count_compiles

transformers = pytest.importorskip("transformers")
from transformers import FlaxLlamaForCausalLM  # noqa: E402

# (rank, alpha, targets) of three adapters
ADAPTERS = [(8, 16, LLAMA_MODULES), (4, 8, ["q_proj", "v_proj"]), (2, 4, ["o_proj", "down_proj"])]
PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [7, 7, 7, 1], [120, 2, 33, 64, 90, 11, 4, 76, 12]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, ignore_eos=True)


@dataclasses.dataclass
class Setup:
    model_dir: str
    model: object  # the Flax reference
    flax_params: dict
    loras: list[LoRARequest]
    tensors: list[dict]  # each adapter's PEFT tensors


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    hf_config = transformers.LlamaConfig(**LLAMA)
    model, flax_params = random_flax_model(FlaxLlamaForCausalLM, hf_config, seed=4)
    root = tmp_path_factory.mktemp("lora")
    (root / "base").mkdir()
    write_checkpoint(root / "base", hf_config, flax_to_torch_state_dict(flax_params))
    loras, tensors = [], []
    for i, (rank, alpha, targets) in enumerate(ADAPTERS, 1):
        path = root / f"adapter{i}"
        path.mkdir()
        tensors.append(
            write_peft_adapter(
                str(path), hf_config, rank=rank, alpha=alpha, targets=targets, seed=i, scale=0.2
            )
        )
        loras.append(LoRARequest(f"adapter{i}", i, str(path)))
    return Setup(str(root / "base"), model, flax_params, loras, tensors)


def merged(flax_params: dict, tensors: dict, rank: int, alpha: float) -> dict:
    """Flax params with the adapter merged: kernel [in, out] += (alpha / r) (B A)^T."""
    flat = dict(flatten_dict(flax_params))
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        path = (*module.split("."), "kernel")
        delta = (alpha / rank) * (np.asarray(b, np.float64) @ np.asarray(a, np.float64)).T
        flat[path] = (np.asarray(flat[path], np.float64) + delta).astype(np.float32)
    return unflatten_dict(flat)


def reference(setup: Setup, adapter: int | None, prompt: list[int], out: list[int]):
    """The reference's log-softmax at the positions that predicted each output token."""
    params = setup.flax_params
    if adapter is not None:
        rank, alpha, _ = ADAPTERS[adapter]
        params = merged(params, setup.tensors[adapter], rank, alpha)
    ids = np.asarray([prompt + out], np.int32)
    logits = np.asarray(setup.model(ids, params=params).logits[0], np.float64)
    logits = logits[len(prompt) - 1 : -1]  # [len(out), V]
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def token_logprobs(output) -> list[float]:
    """Each generated token's logprob (requests made with logprobs=0)."""
    comp = output.outputs[0]
    return [lp[t].logprob for t, lp in zip(comp.token_ids, comp.logprobs, strict=True)]


def check_against_reference(setup: Setup, adapter: int | None, prompt, output) -> None:
    tokens = list(output.outputs[0].token_ids)
    logprobs = token_logprobs(output)
    ref = reference(setup, adapter, prompt, tokens)
    assert tokens == ref.argmax(-1).tolist(), (adapter, tokens)  # greedy: the reference's argmax
    np.testing.assert_allclose(logprobs, ref[np.arange(len(tokens)), tokens], atol=2e-4)


def make_llm(setup: Setup, **kw) -> LLM:
    options = dict(enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=64)
    return LLM(setup.model_dir, **(options | kw))


def test_each_adapter_matches_the_merged_reference_in_one_mixed_batch(setup):
    """Three prompts x (base, adapter 1, adapter 2) in one generate: nine requests in the
    same batches, each with the tokens and logprobs of the reference merged with its own."""
    llm = make_llm(setup, max_batch_size=16)
    cases = [(p, a) for p in PROMPTS for a in (None, 0, 1)]
    loras = [None if a is None else setup.loras[a] for _, a in cases]
    outs = llm.generate([p for p, _ in cases], GREEDY, lora_request=loras, use_tqdm=False)
    for (prompt, adapter), out in zip(cases, outs, strict=True):
        check_against_reference(setup, adapter, prompt, out)
    texts = {a: [o for (_, aa), o in zip(cases, outs, strict=True) if aa == a] for a in (0, 1)}
    assert [o.outputs[0].token_ids for o in texts[0]] != [o.outputs[0].token_ids for o in texts[1]]


def test_more_adapters_than_slots_wait_for_one(setup):
    """max_loras=1 and three adapters in flight: requests wait for the slot, then run right.
    A second pass of the same traffic (the slot refilled four times over) compiles nothing."""
    llm = make_llm(setup, max_loras=1, policy="paged")
    engine = llm.engine

    def serve():
        ids = [
            engine.add_request(PROMPTS[i % 3], GREEDY, lora_request=setup.loras[i % 3])
            for i in range(5)
        ]
        # Adapter 1 takes the slot and its second request shares it; the other three wait.
        assert engine.loras.num_waiting == 3
        assert engine.loras.adapter_names() == (["adapter1"], ["adapter2", "adapter3"])
        done = {}
        while engine.has_unfinished_requests():
            done |= {o.request_id: o for o in engine.step() if o.finished}
        assert engine.loras.num_waiting == 0 and set(done) == set(ids)
        return [done[rid] for rid in ids]

    for i, out in enumerate(serve()):
        check_against_reference(setup, i % 3, PROMPTS[i % 3], out)
    with count_compiles() as counts:
        again = serve()
    assert (counts.traces, counts.compiles) == (0, 0)
    for i, out in enumerate(again):
        check_against_reference(setup, i % 3, PROMPTS[i % 3], out)


def test_prefix_cache_is_kept_apart_per_adapter(setup):
    llm = make_llm(setup, policy="paged", enable_prefix_caching=True, block_size=4)
    prompt = PROMPTS[2]  # 9 tokens: two full blocks of 4 may be cached
    a1, a2 = setup.loras[0], setup.loras[1]
    [first] = llm.generate([prompt], GREEDY, lora_request=a1, use_tqdm=False)
    [other] = llm.generate([prompt], GREEDY, lora_request=a2, use_tqdm=False)
    [again] = llm.generate([prompt], GREEDY, lora_request=a1, use_tqdm=False)
    [base] = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert first.num_cached_tokens == 0 and other.num_cached_tokens == 0
    assert base.num_cached_tokens == 0  # the base model's K/V are not adapter 1's either
    assert again.num_cached_tokens == 8
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    check_against_reference(setup, 1, prompt, other)
    check_against_reference(setup, None, prompt, base)


def test_beam_search_runs_each_beam_with_the_adapter(setup):
    from orca_jax import BeamSearchParams  # noqa: PLC0415

    llm = make_llm(setup, max_logprobs=4)
    beams = BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True)
    [result] = llm.beam_search([PROMPTS[0]], beams, lora_request=setup.loras[0])
    best = result.sequences[0]
    out = best.tokens[len(PROMPTS[0]) :]
    ref = reference(setup, 0, PROMPTS[0], out)  # the adapter's log-probabilities
    np.testing.assert_allclose(best.cum_logprob, ref[np.arange(len(out)), out].sum(), atol=1e-4)
    [plain] = llm.beam_search([PROMPTS[0]], beams)
    assert plain.sequences[0].cum_logprob != pytest.approx(best.cum_logprob, abs=1e-3)


def test_bad_adapters_and_requests_are_clear_errors(setup, tmp_path):
    llm = make_llm(setup, max_lora_rank=4)
    engine = llm.engine
    with pytest.raises(ValueError, match="max_lora_rank=4"):
        engine.add_request([1, 2], GREEDY, lora_request=setup.loras[0])  # rank 8
    with pytest.raises(ValueError, match="adapter_config.json"):
        engine.add_request([1, 2], GREEDY, lora_request=LoRARequest("x", 9, str(tmp_path)))
    with pytest.raises(ValueError, match="already names"):
        other_path = dataclasses.replace(setup.loras[1], lora_path=setup.loras[2].lora_path)
        engine.add_request([1, 2], GREEDY, lora_request=setup.loras[1])
        engine.add_request([1, 2], GREEDY, lora_request=other_path)
    with pytest.raises(ValueError, match="positive"):
        LoRARequest("x", 0, "p")
    assert not engine.loras.num_waiting and len(engine.loras.slot_of) == 1  # just the one added
    plain = LLM(setup.model_dir, max_model_len=64)
    with pytest.raises(ValueError, match="enable_lora"):
        plain.engine.add_request([1, 2], GREEDY, lora_request=setup.loras[1])


@pytest.mark.parametrize("parallel", [dict(pipeline_parallel_size=2), dict(tensor_parallel_size=2)])
def test_adapters_over_several_devices(setup, parallel):
    """Pipeline stages hold their layers' slots; tensor parallelism splits the slots as the
    partition rules split their layers (B on outputs, A on inputs)."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    llm = make_llm(setup, **parallel)
    loras = [setup.loras[0], None, setup.loras[1]]
    outs = llm.generate(PROMPTS, GREEDY, lora_request=loras, use_tqdm=False)
    for prompt, adapter, out in zip(PROMPTS, (0, None, 1), outs, strict=True):
        check_against_reference(setup, adapter, prompt, out)
    if "tensor_parallel_size" in parallel:  # still split after adapters were written in
        lora = llm.engine.runner.stages[0].params["layers"]["lora"]
        b, a = lora["q"]["b"], lora["o"]["a"]  # [L, M, r, N*H] and [L, M, N*H, r]
        assert {s.data.shape[-1] for s in b.addressable_shards} == {b.shape[-1] // 2}
        assert {s.data.shape[-2] for s in a.addressable_shards} == {a.shape[-2] // 2}
        # ... and the adapters add no communication: the step's collectives stay the
        # all-reduces after the row-parallel layers.
        st = llm.engine.runner.stages[0]
        batch = dummy_batch(16, 8, 8, lora=True)
        step = stage_step.lower(
            st.params,
            st.kv_cache,
            None,
            batch,
            llm.engine.model_config,
            st.mesh,
            first=True,
            last=True,
        )
        hlo = step.compile().as_text()
        ops = set(re.findall(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all)\b", hlo))
        assert ops == {"all-reduce"}, ops


def test_server_routes_a_model_name_to_its_adapter(setup):
    from fastapi.testclient import TestClient  # noqa: PLC0415
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    from orca_jax.server import AsyncEngine, build_app  # noqa: PLC0415

    modules = {"adapter1": setup.loras[0], "adapter2": setup.loras[1]}
    engine = AsyncEngine(make_llm(setup).engine)
    offline = make_llm(setup)
    body = dict(prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=0, ignore_eos=True)
    app = build_app(engine, "base", lora_modules=modules, allow_runtime_lora_updating=True)
    try:
        with TestClient(app) as http:
            cards = http.get("/v1/models").json()["data"]
            assert [(c["id"], c["parent"]) for c in cards] == [
                ("base", None),
                ("adapter1", "base"),
                ("adapter2", "base"),
            ]
            assert cards[1]["root"] == setup.loras[0].lora_path
            families = {
                f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)
            }
            [info] = families["orca:lora_requests_info"].samples
            assert info.labels["max_lora"] == "2" and info.labels["running_lora_adapters"] == ""
            [cache] = families["orca:cache_config_info"].samples
            assert cache.labels["cache_dtype"] == "auto" and cache.value == 1
            for model, adapter in (("base", None), ("adapter1", 0), ("adapter2", 1)):
                r = http.post("/v1/completions", json=body | dict(model=model))
                assert r.status_code == 200, r.text
                assert r.json()["model"] == model
                got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
                lora = None if adapter is None else setup.loras[adapter]
                [want] = offline.generate([PROMPTS[0]], GREEDY, lora_request=lora, use_tqdm=False)
                check_against_reference(setup, adapter, PROMPTS[0], want)
                np.testing.assert_allclose(got, token_logprobs(want), atol=1e-5)
            r = http.post("/v1/completions", json=body | dict(model="adapter3"))
            assert r.status_code == 404 and "adapter1" in r.json()["error"]["message"]
            # Runtime updating: a bad adapter changes nothing; a good one is served at once
            # (as adapter 3 offline), and unloaded it is gone.
            load, unload = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
            bad = http.post(load, json=dict(lora_name="adapter3", lora_path="/nonexistent"))
            assert bad.status_code == 400 and "adapter_config.json" in bad.text
            taken = http.post(load, json=dict(lora_name="adapter1", lora_path="/x"))
            assert taken.status_code == 400 and "already served" in taken.text
            path = setup.loras[2].lora_path
            assert http.post(load, json=dict(lora_name="adapter3", lora_path=path)).is_success
            assert "adapter3" in [c["id"] for c in http.get("/v1/models").json()["data"]]
            r = http.post("/v1/completions", json=body | dict(model="adapter3"))
            assert r.status_code == 200 and r.json()["model"] == "adapter3"
            [want] = offline.generate(
                [PROMPTS[0]], GREEDY, lora_request=setup.loras[2], use_tqdm=False
            )
            got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            np.testing.assert_allclose(got, token_logprobs(want), atol=1e-5)
            assert http.post(unload, json=dict(lora_name="adapter3")).is_success
            assert http.post(unload, json=dict(lora_name="adapter3")).status_code == 404
            r = http.post("/v1/completions", json=body | dict(model="adapter3"))
            assert r.status_code == 404
    finally:
        engine.shutdown()


def test_generate_cli_takes_an_adapter(setup):
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    ids = ",".join(map(str, PROMPTS[0]))
    flags = [f"--model={setup.model_dir}", f"--prompt_token_ids={ids}", "--max_tokens=6"]
    flags += ["--max_model_len=64", "--max_lora_rank=8"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "orca_jax.generate",
            *flags,
            f"--lora_path={setup.loras[0].lora_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    tokens = [int(t) for t in run.stdout.split()]
    ref = reference(setup, 0, PROMPTS[0], tokens)
    assert len(tokens) == 6 and tokens == ref.argmax(-1).tolist()


def test_speculative_decoding_keeps_each_adapters_tokens(setup):
    """Drafts are verified under the request's own adapter: n-gram speculation changes no
    token (prompts that repeat themselves, so drafts are proposed and some accepted)."""
    prompts = [PROMPTS[0] * 3, PROMPTS[1] * 4]
    loras = [setup.loras[0], setup.loras[1]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = make_llm(setup).generate(prompts, params, lora_request=loras, use_tqdm=False)
    spec = make_llm(setup, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    drafted = spec.generate(prompts, params, lora_request=loras, use_tqdm=False)
    assert spec.engine.num_draft_tokens > 0
    for a, b in zip(plain, drafted, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
