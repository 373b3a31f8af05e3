"""The simplest generation loop: prefill all prompts together, then decode them together.

No scheduler: every request gets its worst-case pages up front and the batch only shrinks.
The iteration-level engine (`orca_jax.engine`) replaces this for serving; it stays as the
minimal example of driving `ModelRunner` directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from orca_jax.runner import ModelRunner


def greedy_generate(
    runner: ModelRunner,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), stopping at EOS or `max_tokens`."""
    cfg = runner.config
    page = cfg.page_size
    next_page = 1  # page 0 is the null page
    tables = []
    for p in prompts:
        if not p:
            raise ValueError("empty prompt")
        if len(p) + max_tokens > cfg.max_model_len:
            raise ValueError(
                f"prompt of {len(p)} tokens + max_tokens={max_tokens} exceeds "
                f"max_model_len={cfg.max_model_len}"
            )
        n = -(-(len(p) + max_tokens) // page)
        tables.append(list(range(next_page, next_page + n)))
        next_page += n
    if next_page > cfg.num_pages:
        raise ValueError(f"{next_page - 1} KV pages needed, {cfg.num_pages - 1} available")

    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    seqs = [(list(prompts[i]), 0, tables[i]) for i in live]
    while live:
        tokens = np.argmax(runner.run(seqs), axis=-1).tolist()
        still = []
        for i, tok in zip(live, tokens, strict=True):
            outputs[i].append(tok)
            if len(outputs[i]) < max_tokens and tok != eos_token_id:
                still.append(i)
        live = still
        seqs = [([outputs[i][-1]], len(prompts[i]) + len(outputs[i]) - 1, tables[i]) for i in live]
    return outputs
