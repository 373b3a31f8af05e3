"""Speculative decoding by n-gram lookup (vLLM's `ngram` method, "prompt lookup decoding").

A decoding request often repeats text it has already seen: code it edits, a document it
quotes, a list it continues. After each iteration the engine looks for the latest earlier
place where the request's last n tokens occurred (longest n first) and guesses that what
followed then follows now: k draft tokens (where the copy reaches the end of the sequence it
goes on copying itself, so a loop of any period is drafted in full). The next iteration
feeds the last token and the drafts together and samples a token after each of them; drafts
are accepted while they equal what was sampled, and the first sampled token that differs (or
the one after all drafts) comes for free. Each sampled token uses the request's own key for
its output index, so the tokens are exactly those that decoding one at a time would give,
greedy or seeded.

Draft tokens are fixed (a one-hot draft distribution), so accepting a draft exactly when
the target's own sample equals it leaves every token distributed as the target's; this is
rejection sampling's acceptance rule for a one-hot draft.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from orca_jax.scheduler import SamplingParams


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` for the `ngram` method."""

    num_speculative_tokens: int = 3  # drafts per request and iteration, at most (k)
    prompt_lookup_max: int = 4  # longest suffix n-gram looked up
    prompt_lookup_min: int = 1  # shortest suffix n-gram looked up
    method: str = "ngram"
    # Drafts only fill the padding of the token bucket a step's other tokens need, so no
    # step grows for them: right where compute bounds the step (a CPU); elsewhere a larger
    # bucket costs little and drafts take what they need. None: True on a CPU backend.
    within_bucket: bool | None = None

    def __post_init__(self) -> None:
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.within_bucket not in (None, True, False):
            raise ValueError(f"within_bucket must be a bool, got {self.within_bucket!r}")
        if self.method != "ngram":
            raise ValueError(f"speculative method {self.method!r} is not supported (ngram only)")
        if self.num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}"
            )
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min ({self.prompt_lookup_min}) <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> SpeculativeConfig:
        """From vLLM's JSON (`{"method": "ngram", "num_speculative_tokens": 3, ...}`); a
        `prompt_lookup_min` above the default maximum raises the maximum to it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(spec) - fields):
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(fields)}")
        spec = dict(spec)
        if "prompt_lookup_max" not in spec and "prompt_lookup_min" in spec:
            spec["prompt_lookup_max"] = max(spec["prompt_lookup_min"], cls.prompt_lookup_max)
        return cls(**spec)


def can_speculate(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether drafts may be verified for a request now: its sampling rows must not depend
    on the tokens before them (penalties, bad words, structured outputs and the stop ids
    min_tokens holds off do), so that one row serves every position."""
    return not (
        params.has_penalties
        or params.bad_words
        or params.structured_outputs is not None
        or num_output_tokens < params.min_tokens
    )


class NgramIndex:
    """One request's n-grams, each mapped to where it last ended: built as tokens arrive, so a
    lookup costs O(1) whatever the length of the sequence."""

    def __init__(self, config: SpeculativeConfig):
        self._sizes = range(config.prompt_lookup_min, config.prompt_lookup_max + 1)
        # n-gram -> index of the token that followed its latest occurrence.
        self._follower: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this index are in `_follower`

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """`k` tokens copied from after the latest earlier occurrence of the longest suffix
        n-gram of `tokens` (an append-only sequence, the same one at every call), the copy
        running on into itself where it reaches the end; [] when no suffix occurred."""
        end = len(tokens) - 1  # n-grams ending at the last token have no follower yet
        follower = self._follower
        for last in range(self._indexed, end):
            for n in self._sizes:
                if n > last + 1:
                    break
                follower[tuple(tokens[last + 1 - n : last + 1])] = last + 1
        self._indexed = max(self._indexed, end)
        if k < 1:
            return []
        for n in reversed(self._sizes):
            if n <= end:
                at = follower.get(tuple(tokens[end + 1 - n :]))
                if at is not None:
                    draft = list(tokens[at : at + k])
                    period = len(tokens) - at
                    while len(draft) < k:  # the copy reached the end: it copies itself on
                        draft.append(draft[len(draft) - period])  # (a loop goes round)
                    return draft
        return []


def accept(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The tokens a verification step yields: `sampled` (one per draft and one after them)
    up to and including the first that differs from its draft."""
    for i, draft in enumerate(drafts):
        if sampled[i] != draft:
            return list(sampled[: i + 1])
    return list(sampled[: len(drafts) + 1])
