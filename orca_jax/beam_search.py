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

    def check(self, max_logprobs: int) -> None:
        """ValueError unless an engine with `max_logprobs` can run this search (each step
        asks for the 2 x beam_width most likely next tokens)."""
        if 2 * self.beam_width > max_logprobs:
            raise ValueError(
                f"beam_width={self.beam_width} needs the engine's max_logprobs >= "
                f"{2 * self.beam_width}, it has {max_logprobs}"
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


class BeamSearch:
    """One beam search over several prompts, driven a step at a time: `pending()` gives the
    token lists to extend next (empty once done), `advance()` takes the engine's one-token
    outputs for them (`step_params`), `results()` the best beams. A synchronous driver is
    `beam_search`; the server drives it on its asynchronous engine."""

    def __init__(self, prompts: Sequence[list[int]], params: BeamSearchParams, eos: int | None):
        self.params = params
        self.eos = None if params.ignore_eos else eos
        self.step_params = SamplingParams(
            max_tokens=1,
            logprobs=2 * params.beam_width,
            temperature=params.temperature,
            ignore_eos=True,
        )
        self.prompts = [list(p) for p in prompts]
        self._live = [[BeamSearchSequence(list(p), [])] for p in prompts]  # per prompt
        self._done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self._steps = 0

    def _key(self, beam: BeamSearchSequence) -> float:
        return score(beam, self.eos, self.params.length_penalty)

    def pending(self) -> list[list[int]]:
        if self._steps == self.params.max_tokens:
            return []
        return [b.tokens for group in self._live for b in group]

    def advance(self, outs: Sequence[RequestOutput]) -> None:
        """The outputs of `pending()`'s requests, in its order."""
        outs = iter(outs)
        for i, group in enumerate(self._live):
            candidates = []
            for beam in group:
                entry = next(outs).outputs[0].logprobs[0]
                for token, lp in entry.items():
                    grown = BeamSearchSequence(
                        beam.tokens + [token],
                        beam.logprobs + [entry],
                        beam.cum_logprob + lp.logprob,
                    )
                    if token == self.eos:
                        grown.finish_reason = "stop"
                        self._done[i].append(grown)
                    else:
                        candidates.append(grown)
            self._live[i] = sorted(candidates, key=self._key, reverse=True)[
                : self.params.beam_width
            ]
        self._steps += 1

    def results(self, tokenizer: Tokenizer | None) -> list[BeamSearchOutput]:
        outputs = []
        for prompt, finished, group in zip(self.prompts, self._done, self._live, strict=True):
            best = sorted(finished + group, key=self._key, reverse=True)[: self.params.beam_width]
            for beam in best:
                beam.finish_reason = beam.finish_reason or "length"
                if tokenizer is not None:
                    end = len(beam.tokens) - (beam.finish_reason == "stop")
                    beam.text = tokenizer.decode(beam.tokens[len(prompt) : end])
            outputs.append(BeamSearchOutput(best))
        return outputs


def beam_search(
    generate: Callable[[list[list[int]], SamplingParams], list[RequestOutput]],
    tokenizer: Tokenizer | None,
    prompts: Sequence[list[int]],
    params: BeamSearchParams,
) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids); `generate` runs a batch of one-token
    requests to the end (`LLM.generate`)."""
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    search = BeamSearch(prompts, params, eos)
    while beams := search.pending():
        search.advance(generate(beams, search.step_params))
    return search.results(tokenizer)
