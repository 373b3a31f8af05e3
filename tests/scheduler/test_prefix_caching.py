"""Prefix caching: blocks held by count, cached by content, shared by the paged policy."""

import pytest
from sched_utils import FakeRunner, create_scheduler, drive, expected_output

from orca_jax.scheduler import BlockPool, Request, SamplingParams, SchedulerConfig
from orca_jax.scheduler.kv_cache_manager import block_key


def test_pool_counts_holders_and_keeps_cached_blocks_until_handed_out():
    pool = BlockPool(5)
    a, b = pool.allocate(2)
    pool.cache(a, "key-a")
    pool.hold(a)  # a second holder
    assert pool.ref_count(a) == 2 and pool.num_free_blocks == 2
    pool.free([a])
    assert pool.num_free_blocks == 2  # still held once
    pool.free([a, b])
    assert pool.num_free_blocks == 4 and pool.lookup("key-a") == a  # free, still findable
    pool.hold(a)  # taken back from the free list
    assert pool.num_free_blocks == 3 and pool.ref_count(a) == 1
    pool.free([a])
    # Handed out again (oldest freed first: the never-used ones, then b, then a): evicted.
    assert pool.allocate(4)[-1] == a and pool.lookup("key-a") is None
    with pytest.raises(ValueError, match="not cached"):
        pool.hold(a)


def test_pool_refuses_bad_holds_and_frees():
    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    with pytest.raises(ValueError, match="double free"):
        pool.free([a, a])
    assert pool.ref_count(a) == 1  # nothing changed
    pool.free([a])
    with pytest.raises(ValueError, match="not held"):
        pool.cache(a, "k")


def _request(req_id, prompt, max_tokens=3):
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def test_a_repeated_prompt_shares_its_full_blocks():
    sched = create_scheduler("paged", block_size=4, enable_prefix_caching=True)
    runner = FakeRunner(4, sched.requests)
    prompt = list(range(10, 20))  # 10 tokens: two full blocks and a partial one
    sched.add_request(_request("a", prompt))
    out = sched.schedule()
    sched.update(runner.run(out))  # a's prompt computed: blocks 0-1 registered
    sched.add_request(_request("b", prompt + [7]))
    out = sched.schedule()
    [b] = [s for s in out.scheduled if s.req_id == "b"]
    assert (b.start_pos, b.token_ids) == (8, prompt[8:] + [7])  # 8 tokens found cached
    kv = sched.kv_cache_manager
    assert kv.get_block_ids("b")[:2] == kv.get_block_ids("a")[:2]
    assert all(kv.block_pool.ref_count(x) == 2 for x in kv.get_block_ids("a")[:2])
    assert (kv.num_prefix_hits, kv.num_prefix_queries) == (8, 21)
    sched.update(runner.run(out))
    # Both finish (drive checks every read against the reader's own tokens); every block
    # is free again, the full ones still cached.
    drive(sched, {}, runner=runner)
    assert kv.num_free_blocks == sched.config.num_blocks - 1
    assert kv.block_pool.num_cached_blocks >= 2
    sched.add_request(_request("c", prompt))
    out = sched.schedule()
    assert out.scheduled[0].start_pos == 8  # found after its first computers left


def test_a_preempted_request_restarts_from_its_own_cached_blocks():
    # 5 usable blocks of 2 tokens: a and b (3 + 6 tokens each) both start, then outgrow them.
    sched = create_scheduler(
        "paged", block_size=2, num_blocks=6, max_batch_size=2, enable_prefix_caching=True
    )
    requests = [_request("a", [1, 2, 3], 6), _request("b", [20, 21, 22], 6)]
    trace = drive(sched, {0: requests})
    for r in requests:
        assert trace.tokens(r.req_id) == expected_output(r)[0]
    assert sum(r.num_preemptions for r in requests) >= 1
    assert sched.kv_cache_manager.num_prefix_hits > 0  # the restart skipped cached blocks


def test_only_the_paged_policy_caches_prefixes():
    with pytest.raises(ValueError, match="enable_prefix_caching needs policy 'paged'"):
        SchedulerConfig(policy="orca", enable_prefix_caching=True)


def test_block_keys_name_the_whole_prefix():
    a = block_key(b"", [1, 2, 3, 4])
    assert a == block_key(b"", [1, 2, 3, 4]) and len(a) == 16
    assert a != block_key(b"", [1, 2, 4, 3])  # order matters
    assert block_key(a, [5, 6, 7, 8]) != block_key(block_key(b"", [9, 2, 3, 4]), [5, 6, 7, 8])
    assert block_key(b"", [2**40]) != block_key(b"", [0])  # ids are not truncated
