"""Beam search (vLLM's `LLM.beam_search`) against transformers' Flax GPT-2 `generate(num_beams)`.

A random `FlaxGPT2LMHeadModel` is loaded into ours; transformers' own beam search (its
implementation, its model) must find the same best sequence, and our beam's cumulative
log-probability must be what its model gives those tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import flax_to_torch_state_dict, random_flax_model, write_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import FlaxGPT2LMHeadModel  # noqa: E402

from models.loaders import load_safetensors  # noqa: E402
from orca_jax import LLM, BeamSearchParams, Logprob, SamplingParams  # noqa: E402
from orca_jax.beam_search import beam_search  # noqa: E402
from orca_jax.engine.outputs import CompletionOutput, RequestOutput  # noqa: E402

HF = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    hf_config = transformers.GPT2Config(**HF)  # its eos id (50256) is outside this vocab
    model, flax_params = random_flax_model(FlaxGPT2LMHeadModel, hf_config, seed=7)
    directory = tmp_path_factory.mktemp("gpt2")
    cfg = write_checkpoint(directory, hf_config, flax_to_torch_state_dict(flax_params))
    return model, flax_params, cfg, load_safetensors(str(directory))


@pytest.mark.parametrize("policy,kw", [("orca", {}), ("paged", {"enable_prefix_caching": True})])
def test_best_beam_matches_transformers(gpt2, policy, kw):
    import jax  # noqa: PLC0415

    model, flax_params, cfg, params = gpt2
    llm = LLM(params=params, config=cfg, policy=policy, max_logprobs=8, warmup=False, **kw)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, HF["vocab_size"], n).tolist() for n in (5, 11, 3)]
    width, new = 4, 6
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=new))
    for prompt, out in zip(prompts, outs, strict=True):
        want = model.generate(
            np.asarray([prompt]),
            params=flax_params,
            max_new_tokens=new,
            num_beams=width,
            do_sample=False,
            pad_token_id=0,
        ).sequences[0]
        assert len(out.sequences) == width
        best = out.sequences[0]
        assert best.tokens == np.asarray(want).tolist(), (best.tokens, want)
        assert best.finish_reason == "length" and len(best.logprobs) == new
        # its score is what transformers' model gives those tokens
        lp = jax.nn.log_softmax(model(np.asarray([best.tokens]), params=flax_params).logits[0])
        steps = range(len(prompt) - 1, len(best.tokens) - 1)
        total = sum(float(lp[t, best.tokens[t + 1]]) for t in steps)
        assert best.cum_logprob == pytest.approx(total, abs=1e-4)
        scores = [b.cum_logprob for b in out.sequences]  # one length: cum order is score order
        assert scores == sorted(scores, reverse=True)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=new), use_tqdm=False)
    pairs = zip(prompts, greedy, outs, strict=True)
    differ = [p + g.token_ids != o.sequences[0].tokens for p, g, o in pairs]
    assert any(differ)  # the search found what greedy decoding did not
    with pytest.raises(ValueError, match="max_logprobs >= 10"):
        llm.beam_search(prompts, BeamSearchParams(beam_width=5, max_tokens=2))


class _Tok:
    eos_token_id = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_an_ended_beam_leaves_the_search_and_competes_at_the_end():
    """Token 0 is end-of-sequence: a beam that takes it is complete (its text without it)
    and, scoring best, leads the result; the live beams go on without it."""

    def generate(batch, step):
        outs = []
        for tokens in batch:
            first = len(tokens) == 1
            lps = {0: -0.1, 1: -1.0, 2: -2.0} if first else {1: -0.5, 2: -0.6, 0: -3.0}
            entry = {t: Logprob(v) for t, v in lps.items()}
            comp = CompletionOutput(0, "", [next(iter(lps))], logprobs=[entry])
            outs.append(RequestOutput("r", None, tokens, [comp], finished=True))
        return outs

    (out,) = beam_search(generate, _Tok(), [[7]], BeamSearchParams(beam_width=2, max_tokens=2))
    best, second = out.sequences
    assert best.tokens == [7, 0] and best.finish_reason == "stop" and best.text == ""
    assert best.cum_logprob == pytest.approx(-0.1)
    assert second.tokens == [7, 1, 1] and second.text == "1 1"
    assert second.cum_logprob == pytest.approx(-1.5) and second.finish_reason == "length"
