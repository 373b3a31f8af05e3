"""LoRA adapters for the engine: which adapter sits in which device slot, and who waits.

vLLM's model: an engine started with `enable_lora` serves requests that name an adapter
(`LoRARequest`); up to `max_loras` adapters are on the device at once (one slot each,
`models/lora.py`), any mix of them in one batch. A request whose adapter is not on the
device takes a free slot, or the slot of the least recently used adapter no unfinished
request needs; when every slot is in use it waits, first come first served, until one
frees. Adapters are read from disk when a request first names them, so a bad path or shape
is refused at once; their host copies are kept for requests that wait or may come back.
No JAX here: loading and installing go through the callables the engine passes.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """An adapter, as vLLM names one: a name, a positive integer id, a PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer; got {self.lora_int_id!r}")


class LoRAManager:
    """Slots, reference counts and the queue of requests waiting for a slot."""

    def __init__(
        self,
        max_loras: int,
        load: Callable[[str], Any],  # PEFT path -> host weights (raises ValueError)
        install: Callable[[int, Any], None],  # (slot, host weights) -> on the device
        max_cpu_loras: int | None = None,
    ):
        self.max_loras = max_loras
        self._load, self._install = load, install
        self.max_cpu_loras = max(max_cpu_loras or 2 * max_loras, max_loras)
        self._host: collections.OrderedDict[int, Any] = collections.OrderedDict()  # LRU
        self._known: dict[int, LoRARequest] = {}
        self._slots: list[int | None] = [None] * max_loras  # adapter id per slot
        self._users = [0] * max_loras  # unfinished requests holding each slot
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # free slots
        self.slot_of: dict[str, int] = {}  # request id -> slot, while it holds one
        self._waiting: collections.OrderedDict[str, tuple[int, Any]] = collections.OrderedDict()

    def check(self, lora: LoRARequest) -> None:
        """Read (or recall) the adapter's weights: ValueError for a bad one, nothing kept
        half-done. The same id must always name the same adapter."""
        known = self._known.get(lora.lora_int_id)
        if known is not None and known != lora:
            raise ValueError(f"lora_int_id {lora.lora_int_id} already names {known}, not {lora}")
        if lora.lora_int_id not in self._host:
            self._host[lora.lora_int_id] = self._load(lora.lora_path)
            self._known[lora.lora_int_id] = lora
        self._host.move_to_end(lora.lora_int_id)
        self._trim()

    def add(self, req_id: str, lora: LoRARequest, request: Any) -> bool:
        """Give the request a slot (True), or queue `request` until one frees (False). An
        adapter already on the device is shared at once; a new one waits behind earlier
        requests that wait for a slot."""
        lora_id = lora.lora_int_id
        if (lora_id in self._slots or not self._waiting) and self._take(req_id, lora_id):
            return True
        self._waiting[req_id] = (lora_id, request)
        return False

    def admit(self) -> list[Any]:
        """Requests that waited and now hold a slot, in arrival order (to be scheduled):
        those whose adapter is on the device, and those that take a freed slot, first come
        first served."""
        ready, blocked = [], False
        for req_id, (lora_id, request) in list(self._waiting.items()):
            if (lora_id in self._slots or not blocked) and self._take(req_id, lora_id):
                del self._waiting[req_id]
                ready.append(request)
            else:
                blocked = True
        return ready

    def release(self, req_id: str) -> None:
        """A request ended (finished or aborted): its slot, or its place in the queue."""
        self._waiting.pop(req_id, None)
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self._users[slot] -= 1
            if self._users[slot] == 0:
                self._lru[slot] = None  # most recently used last

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def adapter_names(self) -> tuple[list[str], list[str]]:
        """Names of the adapters unfinished requests run with, and of those requests wait
        for (vLLM's `lora_requests_info`; safe to call from another thread)."""
        held = [i for i, n in zip(list(self._slots), list(self._users), strict=True) if n]
        waiting = {lora_id for lora_id, _ in list(self._waiting.values())}
        names = lambda ids: sorted(self._known[i].lora_name for i in ids)  # noqa: E731
        return names(held), names(waiting)

    def _take(self, req_id: str, lora_id: int) -> bool:
        if lora_id in self._slots:
            slot = self._slots.index(lora_id)
        elif self._lru or None in self._slots:
            slot = self._slots.index(None) if None in self._slots else next(iter(self._lru))
            self._install(slot, self._host[lora_id])
            self._slots[slot] = lora_id
        else:
            return False
        self._lru.pop(slot, None)
        self._users[slot] += 1
        self.slot_of[req_id] = slot
        return True

    def _trim(self) -> None:
        """Forget host copies beyond `max_cpu_loras`, oldest first, keeping those that a
        waiting request still needs."""
        needed = {lora_id for lora_id, _ in self._waiting.values()}
        for lora_id in list(self._host):
            if len(self._host) <= self.max_cpu_loras:
                break
            if lora_id not in needed:
                del self._host[lora_id]


def load_adapter(path: str, model_config, max_rank: int) -> dict:
    """A PEFT adapter's weights in our layout (host numpy; `LoRAWeights.targets`), or
    ValueError for one this model or `max_lora_rank` cannot take."""
    from models.loaders.peft_lora import load_peft_lora  # noqa: PLC0415

    weights = load_peft_lora(path, model_config)
    if weights.rank > max_rank:
        raise ValueError(
            f"LoRA adapter {path!r} has rank {weights.rank} > max_lora_rank={max_rank}"
        )
    return weights.targets
