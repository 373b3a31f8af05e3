"""Structured outputs: a JSON schema, a regex, a list of choices or a grammar, enforced
token by token.

JSON schemas, regexes and choices become a regular expression (outlines-core turns JSON
schemas into one), and the regex over the tokenizer's vocabulary becomes an index: a finite
automaton whose states know which token ids may follow. Each request walks its own `Guide`
over the shared index. A context-free grammar (GBNF, llama.cpp's EBNF, or Lark) is no
regular language: llguidance's `LLMatcher` runs an Earley parser over a lexer instead, one
per request, and computes the allowed tokens at each step. Either way, before each of its
sampling steps the engine writes the allowed ids as a bitmask (bit t of word t // 32), and
the sampler sends every other token's logit to -inf. The end-of-sequence token is allowed
once the text is complete, so a request ends when its output is.

outlines-core and llguidance (Rust, no dependencies) do the automaton and parser work:
correct handling of multi-byte tokens against a regex or grammar is subtle, and they are
what vLLM and others build on (vLLM's "guidance" backend is llguidance).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import llguidance
import numpy as np
import outlines_core

from orca_jax.scheduler.sampling_params import StructuredOutputs
from orca_jax.tokenizer import Tokenizer

_REGEX_SPECIAL = set("\\.+*?()|[]{}^$")


def to_regex(spec: StructuredOutputs) -> str:
    """The regular expression a request's whole output must match (not for grammars)."""
    if spec.regex is not None:
        return spec.regex
    if spec.choice is not None:
        return "(" + "|".join(_escape(c) for c in spec.choice) + ")"
    schema = spec.json if spec.json is not None else '{"type": "object"}'
    try:
        return outlines_core.json_schema.build_regex_from_schema(schema)
    except Exception as e:  # noqa: BLE001 -- bad JSON, or a schema feature it lacks
        raise ValueError(f"JSON schema: {e}") from None


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


class GrammarCompiler:
    """One tokenizer's vocabulary as outlines-core sees it, and the index of each regex
    (compiled once: building one walks the whole vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_cached: int = 64):
        """`vocab_size`: the model's (ids at or above it are never allowed)."""
        if tokenizer.eos_token_id is None:
            raise ValueError("structured outputs need a tokenizer with an end-of-sequence token")
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(tokenizer.token_bytes()[:vocab_size]):
            if b and i != tokenizer.eos_token_id:
                by_bytes.setdefault(b, []).append(i)
        self.eos_token_id = tokenizer.eos_token_id
        self.vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, by_bytes)
        self.mask_words = -(-vocab_size // 32)
        self._index = functools.lru_cache(maxsize=max_cached)(self._build_index)
        self._grammar = functools.lru_cache(maxsize=max_cached)(self._compile_grammar)
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._lark_tokenizer: llguidance.LLTokenizer | None = None  # at the first grammar

    def _build_index(self, regex: str) -> outlines_core.Index:
        try:
            return outlines_core.Index(regex, self.vocabulary)
        except Exception as e:  # noqa: BLE001 -- a regex it cannot parse or compile
            raise ValueError(f"cannot build an automaton for regex {regex!r}: {e}") from None

    def _compile_grammar(self, text: str) -> str:
        """llguidance's form of a GBNF or Lark grammar, checked against the vocabulary."""
        if self._lark_tokenizer is None:
            self._lark_tokenizer = llguidance.LLTokenizer(
                self._tokenizer.backend_tokenizer.to_str(),
                n_vocab=self._vocab_size,
                eos_token=self.eos_token_id,
            )
        try:
            grammar = llguidance.grammar_from("grammar", text)
        except Exception as e:  # noqa: BLE001 -- its GBNF converter raises plain Exception
            raise ValueError(f"grammar: {e}") from None
        if error := llguidance.LLMatcher.validate_grammar(grammar, self._lark_tokenizer):
            raise ValueError(f"grammar: {error}")
        return grammar

    def index(self, spec: StructuredOutputs) -> outlines_core.Index | str:
        """The automaton of a constraint, built at its first use (ValueError if it cannot be);
        for a grammar, its checked llguidance form."""
        if spec.grammar is not None:
            return self._grammar(spec.grammar)
        return self._index(to_regex(spec))

    def guide(self, spec: StructuredOutputs) -> TokenGuide:
        """A fresh automaton walk (or grammar parse) for one request."""
        if spec.grammar is not None:
            grammar = self.index(spec)  # builds the tokenizer's llguidance view first
            matcher = llguidance.LLMatcher(self._lark_tokenizer, grammar)
            return GrammarGuide(matcher, self.mask_words, self.eos_token_id)
        return TokenGuide(outlines_core.Guide(self.index(spec)), self.mask_words, self.eos_token_id)


class TokenGuide:
    """One request's position in its regex automaton."""

    def __init__(self, guide: outlines_core.Guide, mask_words: int, eos_token_id: int):
        self._guide = guide
        self.mask_words = mask_words
        self.eos_token_id = eos_token_id

    def allowed_mask(self) -> np.ndarray:
        """i32[ceil(V / 32)]: bit t % 32 of word t // 32 is set when token t may come next."""
        mask = np.zeros(self.mask_words, np.int32)
        self._guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        return mask

    def allowed_tokens(self) -> list[int]:
        return list(self._guide.get_tokens())

    def advance(self, token_id: int) -> None:
        """Move past a sampled token (ValueError if the automaton does not allow it)."""
        if token_id == self.eos_token_id and self._guide.is_finished():
            return  # the end: the automaton has no state after it (the request ends)
        try:
            self._guide.advance(token_id, return_tokens=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"token {token_id} leaves the structured output: {e}") from None


class GrammarGuide(TokenGuide):
    """One request's parse of its grammar (llguidance's matcher)."""

    def __init__(self, matcher: llguidance.LLMatcher, mask_words: int, eos_token_id: int):
        self._matcher = matcher
        self.mask_words = mask_words
        self.eos_token_id = eos_token_id

    def allowed_mask(self) -> np.ndarray:
        mask = np.frombuffer(self._matcher.compute_bitmask(), np.int32)[: self.mask_words]
        return mask.copy()  # its words past the model's vocabulary dropped

    def allowed_tokens(self) -> list[int]:
        return list(mask_to_tokens(self.allowed_mask(), self.mask_words * 32))

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            error = self._matcher.get_error() or "not allowed here"
            raise ValueError(f"token {token_id} leaves the grammar: {error}")


def mask_to_tokens(mask: np.ndarray, vocab_size: int) -> Sequence[int]:
    """The token ids a bitmask allows (tests and debugging)."""
    bits = (mask.astype(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.flatnonzero(bits.reshape(-1)[:vocab_size]).tolist()
