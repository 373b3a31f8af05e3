"""BlockPool: null block, FIFO free list, all-or-nothing allocation, double free."""

import pytest

from orca_jax.scheduler import NULL_BLOCK_ID, BlockPool


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4 and pool.num_free_blocks == 4
    block_ids = pool.allocate(4)
    assert sorted(block_ids) == [1, 2, 3, 4] and NULL_BLOCK_ID not in block_ids
    assert pool.allocate(1) is None
    assert pool.usage == 1.0


def test_allocation_is_all_or_nothing():
    pool = BlockPool(4)
    assert pool.allocate(4) is None
    assert pool.num_free_blocks == 3
    assert pool.allocate(0) == []


def test_free_list_is_fifo():
    pool = BlockPool(6)
    first = pool.allocate(2)
    second = pool.allocate(2)
    pool.free(second)
    pool.free(first)
    # Never-used blocks first, then in the order blocks were freed.
    assert pool.allocate(5) == [5, *second, *first]


def test_double_free_raises_and_frees_nothing():
    pool = BlockPool(4)
    block_ids = pool.allocate(2)
    pool.free(block_ids[:1])
    with pytest.raises(ValueError, match="double free"):
        pool.free(block_ids)
    assert pool.num_free_blocks == 2
    with pytest.raises(ValueError, match="double free"):
        pool.free([block_ids[1], block_ids[1]])
    assert pool.num_free_blocks == 2


@pytest.mark.parametrize("block_id", [NULL_BLOCK_ID, 4, -1])
def test_freeing_a_non_allocatable_id_raises(block_id):
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(ValueError, match="not an allocatable block"):
        pool.free([block_id])


def test_needs_room_beyond_the_null_block():
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        BlockPool(1)
