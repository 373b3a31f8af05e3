"""The tokens each penalized request has seen, in one table that lives as long as the engine.

Penalties read a request's prompt and output tokens every step (`orca_jax.sampler`). Kept as
rows of one `i32[slots, max_model_len]` table, topped up with each new token, a step's
`[R, W]` history is one gather (`SamplingMetadata.build`) instead of R row copies. Row 0 is
all -1: the row of every batch row without penalties. Rows grow in number as needed
(doubling) and go back to a free list when their request ends.
"""

from __future__ import annotations

import numpy as np


class TokenHistory:
    def __init__(self, width: int, slots: int = 64):
        self.width = width  # W: the longest history, the engine's max_model_len
        self.table = np.full((slots, width), -1, np.int32)
        self._free = list(range(slots - 1, 0, -1))  # row 0 stays the all -1 row
        self._filled: dict[int, int] = {}  # slot -> tokens written

    def acquire(self, prompt: list[int]) -> int:
        """A new row holding `prompt`."""
        if len(prompt) > self.width:
            raise ValueError(f"{len(prompt)} prompt tokens; the history holds {self.width}")
        if not self._free:
            grown = len(self.table)
            self.table = np.concatenate([self.table, np.full_like(self.table, -1)])
            self._free = list(range(2 * grown - 1, grown - 1, -1))
        slot = self._free.pop()
        self.table[slot, : len(prompt)] = prompt
        self._filled[slot] = len(prompt)
        return slot

    def extend(self, slot: int, tokens: list[int], num_tokens: int) -> None:
        """Make row `slot` hold `num_tokens` tokens, the last of them from `tokens`
        (a list that ends with the newest ones: the request's output)."""
        filled = self._filled[slot]
        if num_tokens > filled:
            self.table[slot, filled:num_tokens] = tokens[len(tokens) - (num_tokens - filled) :]
            self._filled[slot] = num_tokens

    def release(self, slot: int) -> None:
        self.table[slot, : self._filled.pop(slot)] = -1
        self._free.append(slot)

    @property
    def num_used(self) -> int:
        return len(self._filled)
