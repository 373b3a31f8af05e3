"""One request's sampling state: what its row of each step's `SamplingMetadata` holds.

Built once per request (`SamplingState.create` validates the parameters against the model,
tokenizer and engine limits), then asked for a row each step: penalties read the tokens so
far; the logit bias gathers `logit_bias`, the stop ids `min_tokens` holds off and the bad
words whose prefix was just generated; the token mask is `allowed_token_ids` or the
structured-output automaton's allowed set.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from orca_jax.engine.token_history import TokenHistory
from orca_jax.sampler import RowSampling
from orca_jax.scheduler import Request, SamplingParams
from orca_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from orca_jax.structured import TokenGuide


@dataclasses.dataclass
class SamplingState:
    params: SamplingParams
    stop_ids: tuple[int, ...]  # ids that end the request (held off until min_tokens)
    allowed: np.ndarray | None = None  # i32[M] bitmask of allowed_token_ids
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never to complete
    # Set by the engine once the request is known to be servable:
    seed: int = 0  # of its random stream
    guide: TokenGuide | None = None  # its structured-output automaton
    slot: int = 0  # penalized requests: its row of the engine's `TokenHistory` (0: none yet)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        *,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        mask_words: int,
        max_logit_bias: int,
    ) -> SamplingState:
        """Check `params` against the model and limits (ValueError) and build the state.

        Every row it will give keeps some token possible: combinations that could forbid
        them all (a mask and -inf biases together) are refused here."""
        ids = [t for t, _ in params.logit_bias] + list(params.allowed_token_ids or ())
        if bad := [t for t in ids if t >= vocab_size]:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
        if params.bad_words and tokenizer is None:
            raise ValueError("bad_words need a tokenizer")
        if params.structured_outputs is not None and (
            params.allowed_token_ids is not None or params.bad_words
        ):
            raise ValueError(
                "structured outputs choose the allowed tokens themselves: allowed_token_ids "
                "and bad_words cannot be set with them"
            )
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        eos_ids = (eos,) if eos is not None and not params.ignore_eos else ()
        stop_ids = tuple(dict.fromkeys(params.stop_token_ids + eos_ids))
        allowed_ids = set(params.allowed_token_ids or ())
        if params.min_tokens and allowed_ids and allowed_ids <= set(stop_ids):
            raise ValueError(
                "allowed_token_ids holds only stop ids, which min_tokens forbids at first"
            )
        bad_words = _bad_word_ids(params.bad_words, tokenizer) if params.bad_words else ()
        num_bias = len(params.logit_bias) + len(bad_words)
        num_bias += len(stop_ids) if params.min_tokens else 0
        if num_bias > max_logit_bias:
            raise ValueError(
                f"{num_bias} biased token ids (logit_bias, bad_words, and stop ids held off by "
                f"min_tokens) exceed the engine's max_logit_bias={max_logit_bias}"
            )
        allowed = None
        if params.allowed_token_ids is not None:
            allowed = np.zeros(mask_words, np.uint32)
            for t in params.allowed_token_ids:
                allowed[t // 32] |= np.uint32(1 << (t % 32))
            allowed = allowed.view(np.int32)
        return cls(params, stop_ids, allowed, bad_words)

    def row(self, request: Request, sample: bool, history: TokenHistory) -> tuple | RowSampling:
        """This step's row; the plain 5-tuple when only temperature, top-k, top-p and the
        seed are set. `sample`: whether the step samples for it (a non-final prefill chunk
        does not). Penalized requests keep their tokens in a row of `history`."""
        p, output = self.params, request.output_token_ids
        # The key folds in tokens generated so far: the same whatever the batch.
        row = (p.temperature, p.top_k, p.top_p, self.seed, len(output))
        bias = p.logit_bias
        if len(output) < p.min_tokens:
            bias += tuple((t, -np.inf) for t in self.stop_ids)
        if self.bad_words:
            bias += tuple((t, -np.inf) for t in _banned(self.bad_words, output))
        allowed = None
        if sample:  # a guide never comes with `allowed` (refused in create)
            allowed = self.guide.allowed_mask() if self.guide is not None else self.allowed
        tokens = None
        if p.has_penalties:
            if not self.slot:
                self.slot = history.acquire(request.prompt_token_ids)
            num_prompt = request.num_prompt_tokens
            history.extend(self.slot, output, num_prompt + len(output))
            tokens = (self.slot, num_prompt)
        elif not (bias or allowed is not None or p.min_p):
            return row
        penalties = (p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
        return RowSampling(*row, *penalties, (), (), bias, allowed, p.min_p, tokens)

    def advance(self, token_id: int) -> None:
        """A token was sampled for this request."""
        if self.guide is not None:
            self.guide.advance(token_id)

    def release(self, history: TokenHistory) -> None:
        """The request has ended: its history row goes back."""
        if self.slot:
            history.release(self.slot)
            self.slot = 0


def _bad_word_ids(words: tuple[str, ...], tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """Each bad word's token ids, as written and after a space (as vLLM reads them)."""
    seqs = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in seqs:
                seqs.append(ids)
    return tuple(seqs)


def _banned(seqs: tuple[tuple[int, ...], ...], output: list[int]) -> list[int]:
    """The last token of every bad sequence whose other tokens end the output."""
    return [
        s[-1]
        for s in seqs
        if len(s) == 1 or (len(output) >= len(s) - 1 and output[1 - len(s) :] == list(s[:-1]))
    ]
