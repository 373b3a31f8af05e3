"""Stop strings on streamed text: finding the earliest one in new text, and cutting the
token ids a multi-token delta brought after the token that completed it."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from orca_jax.engine.outputs import CompletionOutput


def drop_after(comp: CompletionOutput, new_ids: list[int], pieces: list[str], end: int) -> None:
    """Cut the new tokens (the last of `comp.token_ids`, `pieces` their texts) after the
    first whose text reaches index `end` of the new text."""
    keep = 1 + bisect.bisect_left(list(itertools.accumulate(map(len, pieces))), end)
    extra = len(new_ids) - keep  # < 0: the stop ends in the text flushed at the end
    if extra > 0:
        del new_ids[keep:], comp.token_ids[-extra:]
        if comp.logprobs is not None:
            del comp.logprobs[len(comp.token_ids) :]


def find_stop(
    text: str, delta: str, stops: Sequence[str], floor: int = 0
) -> tuple[int, str] | None:
    """Earliest stop string ending inside the new text, and after index `floor` of text +
    delta: (its index in text + delta, the stop).

    Only the last `len(stop) - 1` characters of the old text are searched again, so the cost
    per iteration does not grow with the output.
    """
    if not stops or not delta:
        return None
    best = None
    for stop in stops:
        if stop[-1] not in delta:  # a stop ending in the new text ends with one of its chars
            continue
        keep = min(len(text), len(stop) - 1)
        start = max(0, floor - len(stop) + 1 - (len(text) - keep))
        i = (text[len(text) - keep :] + delta).find(stop, start)
        if i >= 0 and (best is None or len(text) - keep + i < best[0]):
            best = (len(text) - keep + i, stop)
    return best
