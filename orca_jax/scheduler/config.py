"""Scheduler configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Policy = Literal["orca", "paged", "static"]
Order = Literal["fcfs", "priority"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Which policy schedules, and the limits it works within."""

    # "orca": Algorithm 1 of the paper; "paged": paged KV + chunked prefill + preemption;
    # "static": request-level batching (the paper's FasterTransformer baseline).
    policy: Policy = "orca"
    # Most requests in one batch (the paper's max_bs).
    max_batch_size: int = 8
    # KV cache blocks, including the reserved null block 0.
    num_blocks: int = 1024
    # Tokens per KV block.
    block_size: int = 16
    # Most tokens in one batch (the device's packed-axis ceiling). paged cuts prompts into
    # chunks to fit it; orca and static feed prompts whole, so their batches stop growing at
    # the first prompt that would not fit, and a longer prompt is rejected at add_request.
    max_num_batched_tokens: int = 2048
    # Batches in flight at once (the paper's n_workers, pipeline stages); orca and paged.
    n_workers: int = 1
    # Longest sequence (prompt + max_tokens) a request may ask for.
    max_model_len: int = 2048
    # Waiting-queue order of the paged policy; "priority" serves lower Request.priority first
    # and preempts the lowest-priority running request. orca and static are FCFS by design.
    scheduling_order: Order = "fcfs"
    # Reuse the K/V of full blocks whose whole prefix an earlier request computed (paged).
    enable_prefix_caching: bool = False
    # Speculative decoding: when set (the runner's token buckets, ascending), a batch's
    # drafts only fill the padding of the bucket its other tokens need, first requests
    # first, so no step grows for them (what a compute-bound device wants).
    draft_token_buckets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.policy not in ("orca", "paged", "static"):
            raise ValueError(f"policy must be 'orca', 'paged' or 'static', got {self.policy!r}")
        for name in (
            "max_batch_size",
            "block_size",
            "max_num_batched_tokens",
            "n_workers",
            "max_model_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.num_blocks, int) or self.num_blocks < 2:
            raise ValueError(
                f"num_blocks must be an int >= 2 (block 0 is reserved), got {self.num_blocks!r}"
            )
        if self.policy == "static" and self.n_workers != 1:
            raise ValueError(
                f"n_workers must be 1 for policy {self.policy!r}, got {self.n_workers}"
            )
        if self.scheduling_order not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_order must be 'fcfs' or 'priority', got {self.scheduling_order!r}"
            )
        if self.enable_prefix_caching and self.policy != "paged":
            raise ValueError(
                f"enable_prefix_caching needs policy 'paged', not {self.policy!r} (orca and "
                "static reserve every block up front, as the paper's Algorithm 1 does)"
            )
        if self.scheduling_order == "priority" and self.policy != "paged":
            raise ValueError(
                f"scheduling_order='priority' needs policy 'paged', not {self.policy!r}"
            )
