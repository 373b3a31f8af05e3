"""SchedulerOutput -> padded RaggedBatch, with block tables kept between iterations.

Rebuilding every request's block table from lists each iteration costs O(total blocks) of
Python per step; instead each live request owns a row of a persistent numpy table, and an
iteration only copies the blocks a request gained since the previous one.
"""

from __future__ import annotations

import itertools

import numpy as np

from models.batch import RaggedBatch, pack_arrays
from orca_jax.runner import RunnerConfig
from orca_jax.scheduler import SchedulerOutput


class BatchBuilder:
    """Packs each iteration's scheduled requests into the runner's shape buckets."""

    def __init__(
        self, config: RunnerConfig, max_live_reqs: int, lora_slots: dict[str, int] | None = None
    ):
        """`lora_slots`: request id -> LoRA slot, kept by the engine (None: no adapters)."""
        self.config = config
        self.lora_slots = lora_slots
        self._table = np.zeros((max_live_reqs, config.max_pages_per_req), np.int32)
        self._num_blocks = np.zeros(max_live_reqs, np.int32)
        self._rows: dict[str, int] = {}
        self._free_rows = list(range(max_live_reqs - 1, -1, -1))

    def _row(self, req_id: str, block_ids: list[int]) -> int:
        row = self._rows.get(req_id)
        if row is None:
            if not self._free_rows:
                raise RuntimeError(f"more than {len(self._table)} requests hold KV blocks")
            row = self._rows[req_id] = self._free_rows.pop()
            self._num_blocks[row] = 0
        have = self._num_blocks[row]
        if len(block_ids) != have:
            if len(block_ids) > self._table.shape[1]:
                raise ValueError(
                    f"request {req_id!r} owns {len(block_ids)} blocks, more than "
                    f"max_model_len allows ({self._table.shape[1]})"
                )
            self._table[row, have : len(block_ids)] = block_ids[have:]
            self._num_blocks[row] = len(block_ids)
        return row

    def release(self, req_ids) -> None:
        """Forget requests whose blocks were freed (finished, aborted or preempted)."""
        for req_id in req_ids:
            row = self._rows.pop(req_id, None)
            if row is not None:
                self._free_rows.append(row)

    def forget(self, out: SchedulerOutput) -> None:
        """Release the rows of requests whose blocks `out` reports freed. Every scheduler
        output must pass here (`build` does it), an empty one too."""
        self.release(out.finished_req_ids)
        self.release(out.preempted_req_ids)

    def build(self, out: SchedulerOutput) -> RaggedBatch:
        """The padded batch of one iteration (requests in `out.scheduled` order)."""
        self.forget(out)
        cfg = self.config
        sched = out.scheduled
        n = len(sched)
        rows = np.fromiter((self._row(s.req_id, s.block_ids) for s in sched), np.int32, n)
        q_lens = np.fromiter((len(s.token_ids) for s in sched), np.int32, n)
        num_blocks = self._num_blocks[rows]
        num_logits = None  # one logits row per request, unless some verifies drafts
        if out.num_draft_tokens:
            num_logits = np.fromiter((1 + s.num_draft_tokens for s in sched), np.int32, n)
        num_rows = n + out.num_draft_tokens
        num_tokens, num_reqs, max_pages = cfg.bucket(
            int(q_lens.sum()), num_rows, int(num_blocks.max())
        )
        return pack_arrays(
            np.fromiter(
                itertools.chain.from_iterable(s.token_ids for s in sched),
                np.int32,
                int(q_lens.sum()),
            ),
            q_lens,
            np.fromiter((s.start_pos for s in sched), np.int32, n),
            self._table[rows, :max_pages],
            num_blocks,
            page_size=cfg.page_size,
            num_tokens=num_tokens,
            num_reqs=num_reqs,
            num_logits=num_logits,
            lora_slots=self._lora(sched),
        )

    def _lora(self, sched) -> np.ndarray | None:
        """i32[n]: each scheduled request's LoRA slot (-1: none); None without adapters."""
        if self.lora_slots is None:
            return None
        get = self.lora_slots.get
        return np.fromiter((get(s.req_id, -1) for s in sched), np.int32, len(sched))
