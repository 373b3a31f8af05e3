"""KVCacheManager: per-request tables over the pool."""

import pytest

from orca_jax.scheduler import KVCacheManager, Request


def req(req_id="a", prompt_len=5):
    return Request(req_id, list(range(prompt_len)))


def test_allocate_slots_grows_to_cover_computed_plus_new_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req()
    assert len(kv.allocate_slots(a, 5)) == 2
    a.num_computed_tokens = 5
    # Positions 5..7 still fit in the second block: nothing new.
    assert kv.allocate_slots(a, 3) == []
    new = kv.allocate_slots(a, 4)
    assert len(new) == 1
    assert kv.get_block_ids("a")[-1] == new[0] and len(kv.get_block_ids("a")) == 3
    assert kv.num_free_blocks == 6
    assert kv.usage == pytest.approx(3 / 9)


def test_allocate_slots_returns_none_and_takes_nothing_when_short():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a, b = req("a"), req("b")
    assert kv.allocate_slots(a, 4) is not None
    assert kv.allocate_slots(b, 4) is None
    assert kv.get_block_ids("b") == [] and kv.num_free_blocks == 1
    assert "b" not in kv.req_to_block_ids


def test_reserve_takes_the_worst_case_up_front():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = req("a"), req("b")
    assert kv.reserve(a, 13)
    assert len(kv.get_block_ids("a")) == 4
    assert not kv.reserve(b, 13)
    assert kv.num_free_blocks == 3 and kv.get_block_ids("b") == []


def test_free_returns_every_block_and_tolerates_empty_tables():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req()
    kv.reserve(a, 9)
    kv.free(a)
    assert kv.num_free_blocks == 7 and kv.get_block_ids("a") == []
    kv.free(a)  # no-op
    assert kv.num_free_blocks == 7


def test_block_ids_are_copies():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req()
    kv.reserve(a, 4)
    kv.get_block_ids("a").append(99)
    assert len(kv.get_block_ids("a")) == 1


def test_can_ever_fit_counts_usable_blocks_only():
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.can_ever_fit(16)
    assert not kv.can_ever_fit(17)
    assert kv.num_blocks_for(0) == 0 and kv.num_blocks_for(1) == 1
