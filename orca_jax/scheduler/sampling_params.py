"""How one request is sampled and when it stops."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredOutputs:
    """What a request's output must be (vLLM's names); exactly one field set. Enforced token
    by token by `orca_jax.structured`; the request ends with the end-of-sequence token once
    its output is complete."""

    json: str | None = None  # a JSON schema (a dict is stored as its JSON text)
    regex: str | None = None  # the whole output matches it
    choice: tuple[str, ...] | None = None  # the output is one of these strings
    json_object: bool = False  # any JSON object
    grammar: str | None = None  # a context-free grammar: GBNF (llama.cpp's EBNF) or Lark

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))  # keeps property order
        if self.json is not None and not isinstance(self.json, str):
            raise ValueError(f"json must be a JSON schema (dict or str), got {self.json!r}")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"regex must be a str, got {self.regex!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be a str, got {self.grammar!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(
                isinstance(c, str) and c for c in self.choice
            ):
                raise ValueError(f"choice must be a list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice:
                raise ValueError("choice must not be empty")
        given = [self.json, self.regex, self.choice, self.grammar]
        if sum(g is not None for g in given) + bool(self.json_object) != 1:
            raise ValueError("set exactly one of json, regex, choice, grammar and json_object")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping settings of one request, in vLLM's idiom.

    Lists given for `stop` or `stop_token_ids` are stored as tuples, so the object stays
    hashable. Stop strings are matched by the engine after detokenizing; the scheduler only
    checks token ids (`stop_token_ids`, the end-of-sequence id unless `ignore_eos`) and
    `max_tokens`.
    """

    # Most tokens to generate; the request finishes with reason "length" when it gets there.
    max_tokens: int = 16
    # Softmax temperature; 0 means greedy (argmax).
    temperature: float = 0.0
    # Keep only the k most likely tokens; 0 turns the filter off.
    top_k: int = 0
    # Keep the smallest set of tokens whose probability reaches top_p; 1 turns it off.
    top_p: float = 1.0
    # Drop tokens less likely than min_p times the most likely one (after temperature;
    # vLLM's `min_p`); 0 turns it off.
    min_p: float = 0.0
    # Seed of this request's random stream; None draws from the engine's stream.
    seed: int | None = None
    # Stop strings, checked by the engine on the detokenized text.
    stop: tuple[str, ...] | None = ()
    # Token ids that end the request (reason "stop"); the stop token is kept in the output.
    stop_token_ids: tuple[int, ...] | None = ()
    # Keep generating past the end-of-sequence token (the paper's benchmark setting).
    ignore_eos: bool = False
    # Number of top log-probabilities to return per token; None returns none.
    logprobs: int | None = None
    # Score the prompt: per prompt token (after the first) its log-probability and the top
    # n alternatives (`RequestOutput.prompt_logprobs`); None scores nothing. Such a request
    # computes its whole prompt (no prefix-cache hits: cached tokens would go unscored).
    prompt_logprobs: int | None = None
    # Penalties on tokens already seen, applied to the logits before sampling (greedy too),
    # as vLLM does. presence / frequency in [-2, 2] over the generated tokens: minus p once a
    # token appeared, minus f per time it did; 0 turns them off. repetition > 0 over prompt
    # and generated tokens: a seen token's logit is divided by it when positive, multiplied
    # otherwise; 1 turns it off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Added to the logits of these token ids before sampling (greedy too), OpenAI's
    # `logit_bias`: {token id: bias in [-100, 100]}; -100 all but bans a token, 100 all but
    # forces it. Stored as sorted (id, bias) pairs.
    logit_bias: Mapping[int, float] | tuple[tuple[int, float], ...] | None = ()
    # End-of-sequence and stop token ids cannot be sampled, and stop strings are not looked
    # for, before this many tokens (vLLM's `min_tokens`).
    min_tokens: int = 0
    # Constrain the output to a JSON schema, a regex or a list of choices.
    structured_outputs: StructuredOutputs | None = None
    # Only these token ids may be generated (vLLM's `allowed_token_ids`); None: any.
    allowed_token_ids: tuple[int, ...] | None = None
    # Words never to generate: the last token of a word (as written, and after a space) is
    # banned whenever the output ends with the word's other tokens (vLLM's `bad_words`).
    bad_words: tuple[str, ...] | None = ()
    # Keep the stop string that ended the request in its text.
    include_stop_str_in_output: bool = False
    # Leave special tokens (<|im_end|>...) out of the text; the token ids keep them.
    skip_special_tokens: bool = True
    # Build the output text (vLLM's `detokenize`); False: token ids only, no text work.
    detokenize: bool = True
    # Keep only the last k tokens of the prompt (None: all; a longer prompt is an error).
    truncate_prompt_tokens: int | None = None
    # Completions of the prompt. `LLM.generate` and the server fan out into n requests of one
    # completion each (`completions()`); the engine itself takes n=1.
    n: int = 1

    def __post_init__(self) -> None:
        # Frozen dataclass: normalize through object.__setattr__. None means none, as in
        # vLLM (and what a JSON null sends).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        _check_int("max_tokens", self.max_tokens, minimum=1)
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_int("top_k", self.top_k, minimum=0)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:  # also rejects NaN
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entries", t, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0)
        _check_int("n", self.n, minimum=1)
        bias = self.logit_bias or ()
        pairs = list(bias.items() if isinstance(bias, Mapping) else bias)
        for pair in pairs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"logit_bias entries must be (token id, bias), got {pair!r}")
            _check_int("logit_bias token ids", pair[0], minimum=0)
            value = pair[1]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"logit_bias values must be numbers, got {value!r}")
            if not -100 <= value <= 100:  # also rejects NaN
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        object.__setattr__(self, "logit_bias", tuple(sorted((t, float(v)) for t, v in pairs)))
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids entries", t, minimum=0)
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        object.__setattr__(self, "bad_words", tuple(self.bad_words or ()))
        for w in self.bad_words:
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"bad_words must be non-empty str, got {w!r}")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, minimum=1)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputs):
                raise ValueError("structured_outputs must be a StructuredOutputs")
            if self.ignore_eos or self.min_tokens:
                raise ValueError(
                    "structured outputs end with the end-of-sequence token: ignore_eos and "
                    "min_tokens cannot be set with them"
                )
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are found in the text: they need detokenize=True")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} exceeds max_tokens={self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def completions(self) -> list[SamplingParams]:
        """One n=1 copy per completion; with a `seed`, completion j samples from seed + j, so
        the n completions differ yet each is reproducible."""
        return [
            dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + j)
            for j in range(self.n)
        ]

    @property
    def has_penalties(self) -> bool:
        """True when some penalty changes the logits."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    # bool is an int subclass; `max_tokens=True` is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
