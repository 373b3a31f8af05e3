"""Beam search over the engine, as vLLM's `LLM.beam_search` does it.

Each step asks the engine for one token of every live beam (a request of prompt + beam
tokens, `max_tokens=1`) with the `2 * beam_width` most likely next tokens' logprobs; every
beam extended by each of those is a candidate, and the `beam_width` best candidates of a
prompt (by `score`) live on. A candidate ending in end-of-sequence is complete and leaves
the search. At the end the complete and live beams of each prompt compete, best first.

The engine needs no beam support of its own: beams of one prompt share their prefix, which
a paged engine with `enable_prefix_caching` computes once (`LLM(policy="paged",
enable_prefix_caching=True)`); other engines recompute it each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from orca_jax.engine.outputs import Logprob, RequestOutput
from orca_jax.scheduler import SamplingParams
from orca_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search parameters."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False  # end-of-sequence does not end a beam
    temperature: float = 0.0  # of the token each step samples (it is a candidate too)
    length_penalty: float = 1.0  # scores are cum_logprob / length ** length_penalty

    def __post_init__(self) -> None:
        if self.beam_width < 1 or self.max_tokens < 1:
            raise ValueError(
                f"beam_width and max_tokens must be >= 1, got {self.beam_width}, {self.max_tokens}"
            )


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: its tokens (prompt first) and what they scored."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]  # per generated token: the candidates it came from
    cum_logprob: float = 0.0
    text: str | None = None  # the generated tokens' text (end-of-sequence left out)
    finish_reason: str | None = None  # "stop": it ended with end-of-sequence; else "length"


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # the best beam_width, best first


def score(beam: BeamSearchSequence, eos_token_id: int | None, length_penalty: float) -> float:
    """vLLM's beam score: cumulative logprob over the length (prompt included, a final
    end-of-sequence not) to the power `length_penalty`."""
    length = len(beam.tokens) - (beam.tokens[-1] == eos_token_id)
    return beam.cum_logprob / length**length_penalty


Generate = Callable[[list[list[int]], SamplingParams], list[RequestOutput]]


def beam_search(
    generate: Generate,
    tokenizer: Tokenizer | None,
    prompts: Sequence[list[int]],
    params: BeamSearchParams,
) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids); `generate` runs a batch of one-token
    requests to the end (`LLM.generate`)."""
    eos = tokenizer.eos_token_id if tokenizer is not None and not params.ignore_eos else None
    width = params.beam_width
    step = SamplingParams(
        max_tokens=1, logprobs=2 * width, temperature=params.temperature, ignore_eos=True
    )
    live = [[BeamSearchSequence(list(p), [])] for p in prompts]  # per prompt
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]

    def key(beam: BeamSearchSequence) -> float:
        return score(beam, eos, params.length_penalty)

    for _ in range(params.max_tokens):
        beams = [b for group in live for b in group]
        if not beams:
            break
        outs = iter(generate([b.tokens for b in beams], step))
        for i, group in enumerate(live):
            candidates = []
            for beam in group:
                entry = next(outs).outputs[0].logprobs[0]
                for token, lp in entry.items():
                    grown = BeamSearchSequence(
                        beam.tokens + [token],
                        beam.logprobs + [entry],
                        beam.cum_logprob + lp.logprob,
                    )
                    if token == eos:
                        grown.finish_reason = "stop"
                        done[i].append(grown)
                    else:
                        candidates.append(grown)
            live[i] = sorted(candidates, key=key, reverse=True)[:width]
    outputs = []
    for prompt, finished, group in zip(prompts, done, live, strict=True):
        best = sorted(finished + group, key=key, reverse=True)[:width]
        for beam in best:
            beam.finish_reason = beam.finish_reason or "length"
            if tokenizer is not None:
                end = len(beam.tokens) - (beam.finish_reason == "stop")
                beam.text = tokenizer.decode(beam.tokens[len(prompt) : end])
        outputs.append(BeamSearchOutput(best))
    return outputs
