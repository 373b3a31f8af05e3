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
    # Penalized requests: i32[prompt + max_tokens] prompt then output tokens, filled as they
    # come (`_history`), so a step copies a row of numpy, not the whole context from lists.
    _tokens: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _filled: int = 0

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

    def row(self, request: Request, sample: bool) -> tuple | RowSampling:
        """This step's row; the plain 5-tuple when only temperature, top-k, top-p and the
        seed are set. `sample`: whether the step samples for it (a non-final prefill chunk
        does not)."""
        p = self.params
        # The key folds in tokens generated so far: the same whatever the batch.
        row = (p.temperature, p.top_k, p.top_p, self.seed, request.num_output_tokens)
        extra = {"min_p": p.min_p} if p.min_p else {}
        if p.has_penalties:
            tokens, num_prompt = self._history(request), request.num_prompt_tokens
            extra.update(
                presence=p.presence_penalty,
                frequency=p.frequency_penalty,
                repetition=p.repetition_penalty,
                prompt=tokens[:num_prompt],
                output=tokens[num_prompt:],
            )
        bias = p.logit_bias
        if request.num_output_tokens < p.min_tokens:
            bias += tuple((t, -np.inf) for t in self.stop_ids)
        if self.bad_words:
            bias += tuple((t, -np.inf) for t in _banned(self.bad_words, request.output_token_ids))
        if bias:
            extra["bias"] = bias
        if sample and self.guide is not None:  # never with `allowed` (refused in create)
            extra["allowed"] = self.guide.allowed_mask()
        elif sample and self.allowed is not None:
            extra["allowed"] = self.allowed
        return RowSampling(*row, **extra) if extra else row

    def _history(self, request: Request) -> np.ndarray:
        """i32[prompt + output so far]: a view of the buffer, topped up with new tokens."""
        num_prompt = request.num_prompt_tokens
        if self._tokens is None:
            self._tokens = np.empty(request.max_total_tokens, np.int32)
            self._tokens[:num_prompt] = request.prompt_token_ids
            self._filled = num_prompt
        end = num_prompt + request.num_output_tokens
        if end > self._filled:
            self._tokens[self._filled : end] = request.output_token_ids[self._filled - num_prompt :]
            self._filled = end
        return self._tokens[:end]

    def advance(self, token_id: int) -> None:
        """A token was sampled for this request."""
        if self.guide is not None:
            self.guide.advance(token_id)


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
