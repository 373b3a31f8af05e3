"""Structured outputs: the text obeys its regex, choice or JSON schema whatever the weights.

A tiny Llama with SmolLM2's real vocabulary (random weights, so the model itself knows no
JSON) must still produce outputs that Python's own `re` and `json` accept: only the token
mask can make that happen. Neighbours in the batch are unaffected, and a warmed-up engine
compiles nothing for constrained batches.
"""

from __future__ import annotations

import ast
import json
import re
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from models import get_config, init_params
from models.loaders.gguf_llama import default_model_path
from orca_jax import Engine, EngineConfig, SamplingParams, StructuredOutputs
from orca_jax.sampler import RowSampling, SamplingMetadata, sample
from orca_jax.structured import GrammarCompiler, mask_to_tokens, to_regex
from orca_jax.tokenizer import Tokenizer
from orca_jax.utils.compilation import count_compiles

CFG = get_config("tiny-llama", vocab_size=49152, max_seq_len=256)
PARAMS = init_params(CFG, seed=11)
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "capital": {"type": "boolean"},  # bounded: random weights could write digits forever
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["city", "capital"],
}
PHONE = r"[0-9]{3}-[0-9]{4}"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(default_model_path())


def _engine(tok, **kw) -> Engine:
    kw = (
        dict(max_batch_size=4, block_size=8, num_kv_blocks=80, max_model_len=160, warmup=False) | kw
    )
    return Engine(CFG, PARAMS, tok, EngineConfig(**kw))


def _serve(engine: Engine, requests) -> dict[str, object]:
    ids = [engine.add_request(p, sp) for p, sp in requests]
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return [done[i] for i in ids]


def _check(out, spec: StructuredOutputs, tok) -> None:
    """The output is complete and valid, judged by Python's re / json, not by our automaton."""
    comp = out.outputs[0]
    assert comp.finish_reason == "stop" and comp.token_ids[-1] == tok.eos_token_id, comp.text
    if spec.regex is not None:
        assert re.fullmatch(spec.regex, comp.text), comp.text
    elif spec.choice is not None:
        assert comp.text in spec.choice
    else:
        value = json.loads(comp.text)
        assert value["city"] in ("Paris", "Rome") and isinstance(value["capital"], bool)
        assert all(isinstance(t, str) and len(t) <= 4 for t in value.get("tags", []))
        assert len(value.get("tags", [])) <= 2


SPECS = [
    StructuredOutputs(regex=PHONE),
    StructuredOutputs(choice=["yes.", "no (really)", "maybe"]),
    StructuredOutputs(json=SCHEMA),
]


def test_the_mask_is_the_automatons_allowed_set(tok):
    grammars = GrammarCompiler(tok, CFG.vocab_size)
    guide = grammars.guide(StructuredOutputs(regex=PHONE))
    allowed = mask_to_tokens(guide.allowed_mask(), CFG.vocab_size)
    assert sorted(allowed) == sorted(guide.allowed_tokens())
    assert {tok.decode([t]) for t in allowed} <= set("0123456789")
    assert tok.eos_token_id not in allowed  # not complete yet
    # Regex metacharacters in choices are literal.
    assert re.fullmatch(to_regex(StructuredOutputs(choice=["a.b", "(c)"])), "(c)")
    assert not re.fullmatch(to_regex(StructuredOutputs(choice=["a.b"])), "axb")


def test_masked_rows_sample_only_allowed_tokens():
    vocab = 70
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, vocab)) * 4, jnp.float32)
    allowed = [5, 33, 64, 69]
    mask = np.zeros(3, np.int32)  # ceil(70 / 32) words
    for t in allowed:
        mask[t // 32] |= np.int32(1 << (t % 32)) if t % 32 != 31 else np.int32(-(2**31))
    rows = [RowSampling(1.0, 0, 1.0, seed, 0, allowed=mask) for seed in range(2)] + [
        (0.0, 0, 1.0, 0, 0)
    ]
    picked = set()
    for step in range(200):
        rows[0] = rows[0]._replace(step=step)
        md = SamplingMetadata.build(rows, 4, mask_words=3)
        toks = np.asarray(sample(jnp.concatenate([logits, logits[:1]]), md)[0])
        picked |= {int(toks[0]), int(toks[1])}
        assert toks[2] == np.argmax(logits[2])  # unconstrained row untouched
    assert picked <= set(allowed) and len(picked) >= 3
    greedy = SamplingMetadata.build([RowSampling(0.0, 0, 1.0, 0, 0, allowed=mask)], 1, 0, 0, 3)
    assert int(sample(logits[:1], greedy)[0][0]) == allowed[int(np.argmax(logits[0, allowed]))]


@pytest.mark.parametrize(
    "policy,kw",
    [
        ("orca", {}),
        ("paged", {"n_workers": 2, "num_kv_blocks": 8, "max_num_batched_tokens": 16}),
        ("static", {}),
    ],
)
def test_outputs_obey_their_constraint_and_neighbours_are_unchanged(tok, policy, kw):
    prompt = tok.encode("Answer: ")
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    requests = 2 * [(prompt, SamplingParams(max_tokens=48, structured_outputs=s)) for s in SPECS]
    requests.append((prompt, plain))
    sampled = SamplingParams(max_tokens=48, temperature=1.0, seed=4, structured_outputs=SPECS[2])
    requests.append((prompt, sampled))
    engine = _engine(tok, policy=policy, **kw)
    outs = _serve(engine, requests)
    for out, (_, sp) in zip(outs, requests, strict=True):
        if sp.structured_outputs is not None:
            _check(out, sp.structured_outputs, tok)
    [alone] = _serve(_engine(tok, policy=policy), [(prompt, plain)])
    assert outs[6].token_ids == alone.token_ids
    if "num_kv_blocks" in kw:
        assert engine.num_preemptions > 0


def test_warmed_up_constrained_batches_compile_nothing(tok):
    engine = _engine(tok, warmup=True, max_num_batched_tokens=32, max_model_len=64)
    prompt = tok.encode("Say: ")
    requests = [
        (prompt, SamplingParams(max_tokens=40, structured_outputs=SPECS[i % 2], logit_bias=b))
        for i, b in enumerate([None, {5: 1.0}, None, {7: -2.0}])
    ] + [(prompt, SamplingParams(max_tokens=5, ignore_eos=True, presence_penalty=0.5))]
    with count_compiles() as counts:
        outs = _serve(engine, requests)
    assert (counts.traces, counts.compiles) == (0, 0)
    for out, (_, sp) in zip(outs[:4], requests[:4], strict=True):
        _check(out, sp.structured_outputs, tok)


def test_bad_constraints_are_clear_errors(tok):
    engine = _engine(tok)
    no_tok = Engine(CFG, PARAMS, None, EngineConfig(warmup=False, num_kv_blocks=20))
    spec = StructuredOutputs(regex="a+")
    cases = [
        (lambda: StructuredOutputs(), "exactly one"),
        (lambda: StructuredOutputs(regex="a", choice=["b"]), "exactly one"),
        (lambda: StructuredOutputs(choice=[]), "must not be empty"),
        (lambda: SamplingParams(structured_outputs=spec, ignore_eos=True), "ignore_eos"),
        (lambda: no_tok.add_request([1, 2], SamplingParams(structured_outputs=spec)), "tokenizer"),
        (
            lambda: engine.add_request(
                [1], SamplingParams(structured_outputs=StructuredOutputs(regex="(a"))
            ),
            "regex",
        ),
        (
            lambda: engine.add_request(
                [1], SamplingParams(structured_outputs=StructuredOutputs(json="{not json"))
            ),
            "JSON schema",
        ),
    ]
    both = dict(structured_outputs=spec, max_tokens=4)
    cases += [
        (lambda: engine.add_request([1], SamplingParams(**both, allowed_token_ids=[5])), "allowed"),
        (lambda: engine.add_request([1], SamplingParams(**both, bad_words=["x"])), "bad_words"),
        (
            lambda: engine.add_request(
                [1], SamplingParams(min_tokens=2, allowed_token_ids=[tok.eos_token_id])
            ),
            "only stop ids",
        ),
    ]
    for fn, words in cases:
        with pytest.raises(ValueError, match=words):
            fn()
    assert not engine.has_unfinished_requests()  # nothing was queued


def test_a_refused_token_ends_only_its_request(tok, monkeypatch):
    """Should an automaton ever refuse a sampled token, that request ends ("abort") and the
    engine goes on serving the others."""
    from orca_jax.structured import TokenGuide  # noqa: PLC0415

    def refuse(self, token_id):
        raise ValueError("refused")

    monkeypatch.setattr(TokenGuide, "advance", refuse)
    engine = _engine(tok)
    prompt = tok.encode("Say: ")
    outs = _serve(
        engine,
        [
            (prompt, SamplingParams(max_tokens=9, structured_outputs=SPECS[0])),
            (prompt, SamplingParams(max_tokens=9, ignore_eos=True)),
        ],
    )
    assert outs[0].outputs[0].finish_reason == "abort" and len(outs[0].token_ids) == 1
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].token_ids) == 9


def test_a_slow_automaton_builds_beside_the_engine_loop(tok):
    """Any-JSON's automaton takes seconds to build; `prepare_structured` (what the server
    calls in a worker thread) does not hold the engine back meanwhile, and the request that
    then uses it finds it built."""
    engine = _engine(tok)
    spec = StructuredOutputs(json_object=True)
    builder = threading.Thread(target=engine.prepare_structured, args=(spec,))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=10_000 // 80, ignore_eos=True))
    builder.start()
    steps = 0
    while builder.is_alive() and engine.has_unfinished_requests():
        engine.step()
        steps += 1
    builder.join()
    assert steps >= 20  # iterations ran while the index was being built
    grammars = engine._grammars
    before = grammars._index.cache_info().hits
    engine.add_request([1], SamplingParams(max_tokens=30, structured_outputs=spec))
    assert grammars._index.cache_info().hits == before + 1  # built once, reused
    with pytest.raises(ValueError, match="regex"):
        engine.prepare_structured(StructuredOutputs(regex="(a"))


# Nested lists, two deep, at most three items each: context-free (brackets must balance), so
# no regex can say it; bounded, so random weights cannot go on forever.
NESTED = """
root ::= "[" (item ("," item){0,2})? "]"
item ::= digit | "[" (digit ("," digit){0,2})? "]"
digit ::= [0-9]
"""
LARK = """
start: "(" sum ")"
sum: DIGIT (("+" | "*") DIGIT)~0..3
DIGIT: /[0-9]/
"""


def _nested(text: str) -> bool:
    """Whether `text` is what NESTED describes, judged by Python's own literal parser."""
    value = ast.literal_eval(text)

    def digits(v):
        return isinstance(v, list) and len(v) <= 3 and all(x in range(10) for x in v)

    return (
        isinstance(value, list)
        and len(value) <= 3
        and all(x in range(10) or digits(x) for x in value)
        and re.fullmatch(r"[\[\],0-9]+", text) is not None
    )


@pytest.mark.parametrize(
    "policy,kw", [("orca", {}), ("paged", {"num_kv_blocks": 12, "block_size": 4, "n_workers": 2})]
)
def test_grammar_outputs_parse(tok, policy, kw):
    """GBNF and Lark grammars (llguidance): greedy and sampled outputs are complete sentences
    of their grammar, judged by Python's parser and `re`, beside regex and plain requests."""
    prompt = tok.encode("List: ")
    nested, lark = StructuredOutputs(grammar=NESTED), StructuredOutputs(grammar=LARK)
    requests = [
        (prompt, SamplingParams(max_tokens=40, structured_outputs=nested)),
        *[
            (prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=s, structured_outputs=g))
            for s in range(3)
            for g in (nested, lark)
        ],
        (prompt, SamplingParams(max_tokens=40, structured_outputs=SPECS[0])),
        (prompt, SamplingParams(max_tokens=12, ignore_eos=True)),
    ]
    engine = _engine(tok, policy=policy, **kw)
    outs = _serve(engine, requests)
    for out, (_, sp) in zip(outs[:7], requests[:7], strict=True):
        comp = out.outputs[0]
        assert comp.finish_reason == "stop" and comp.token_ids[-1] == tok.eos_token_id
        if sp.structured_outputs is nested:
            assert _nested(comp.text), comp.text
        else:
            assert re.fullmatch(r"\([0-9]([+*][0-9]){0,3}\)", comp.text), comp.text
    _check(outs[7], SPECS[0], tok)
    assert len({o.outputs[0].text for o in outs[1:7:2]}) > 1  # sampling varied the lists
    if policy == "paged":
        assert engine.num_preemptions > 0
    with pytest.raises(ValueError, match="grammar.*not found"):
        bad = StructuredOutputs(grammar="root ::= x")
        engine.add_request(prompt, SamplingParams(structured_outputs=bad))
