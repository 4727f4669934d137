"""Tests of the C++ core (nudge_engine._core): block pools, sequences, scheduler, batch builder."""
from __future__ import annotations

import gc
import math
import random

import numpy as np
import pytest
import torch

from nudge_engine import _core
from nudge_engine._core import NO_BLOCK, NO_LOGITS, BlockPool, Scheduler, Sequence, build_batch


def make_seq(pool: BlockPool, num_tokens: int, first_token: int = 0) -> Sequence:
    seq = Sequence(pool)
    seq.append(list(range(first_token, first_token + num_tokens)))
    return seq


def assert_pools_free(*pools: BlockPool) -> None:
    for pool in pools:
        assert pool.all_free(), pool
        assert pool.num_free == pool.num_blocks


# --------------------------------------------------------------------------- BlockPool


def test_pool_allocate_until_exhausted_then_free():
    pool = BlockPool(4, 16)
    assert (pool.num_blocks, pool.block_size, pool.num_free) == (4, 16, 4)
    blocks = [pool.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert pool.num_free == 0 and not pool.can_allocate(1) and pool.can_allocate(0)
    with pytest.raises(RuntimeError, match="KV block pool exhausted"):
        pool.allocate()
    for b in blocks:
        assert pool.ref_count(b) == 1
        pool.decref(b)
    assert_pools_free(pool)
    assert pool.can_allocate(4) and not pool.can_allocate(5)


def test_pool_refcounts():
    pool = BlockPool(2, 4)
    b = pool.allocate()
    pool.incref(b)
    pool.incref(b)
    assert pool.ref_count(b) == 3
    pool.decref(b)
    pool.decref(b)
    assert pool.ref_count(b) == 1 and pool.num_free == 1 and not pool.all_free()
    pool.decref(b)
    assert pool.ref_count(b) == 0
    assert_pools_free(pool)


def test_pool_errors():
    pool = BlockPool(3, 4)
    b = pool.allocate()
    pool.decref(b)
    with pytest.raises(ValueError, match="double free"):
        pool.decref(b)
    with pytest.raises(ValueError, match="free block"):
        pool.incref(b)
    for bad in (-1, 3, 1 << 40):
        for op in (pool.incref, pool.decref, pool.ref_count):
            with pytest.raises(ValueError, match="out of range"):
                op(bad)
    with pytest.raises(ValueError):
        pool.can_allocate(-1)
    with pytest.raises(TypeError):  # does not even fit an int64: pybind11 refuses the call
        pool.decref(1 << 70)
    for num_blocks, block_size in ((0, 4), (4, 0), (-1, 4), (4, -16), (1 << 40, 4)):
        with pytest.raises(ValueError):
            BlockPool(num_blocks, block_size)
    with pytest.raises(AttributeError):
        pool.num_free = 7
    assert_pools_free(pool)


# --------------------------------------------------------------------------- Sequence


def test_sequence_append_reserve_compute():
    pool = BlockPool(8, 4)
    seq = Sequence(pool)
    seq.append([5, 6, 7])
    seq.append(8)
    seq.append(np.int64(9))
    assert seq.tokens == [5, 6, 7, 8, 9] and seq.num_tokens == 5 and seq.num_computed == 0
    assert seq.blocks_needed(5) == 2 and seq.blocks_needed(0) == 0
    with pytest.raises(ValueError, match="reserved"):
        seq.set_num_computed(1)  # no slots yet
    assert seq.reserve(5)
    assert len(seq.block_table) == 2 and seq.num_reserved_slots == 8 and pool.num_free == 6
    assert seq.reserve(8) and len(seq.block_table) == 2  # already covered: no new block
    assert seq.blocks_needed(9) == 1
    seq.set_num_computed(5)
    assert seq.num_computed == 5
    with pytest.raises(ValueError):
        seq.set_num_computed(6)  # beyond num_tokens
    seq.release()
    assert seq.block_table == [] and seq.num_computed == 0 and seq.num_tokens == 5
    assert_pools_free(pool)


def test_sequence_reserve_is_all_or_nothing():
    pool = BlockPool(3, 4)
    seq = make_seq(pool, 10)
    other = make_seq(pool, 4)
    assert other.reserve(4)
    table_before = seq.block_table
    assert not seq.reserve(10)  # needs 3, 2 are free
    assert seq.block_table == table_before and pool.num_free == 2
    assert seq.reserve(8) and pool.num_free == 0
    other.release()
    seq.release()
    assert_pools_free(pool)


@pytest.mark.parametrize("keep", [0, 1, 3, 4, 5, 8, 9, 12])
def test_sequence_truncate_frees_blocks_beyond_ceil(keep):
    block_size = 4
    pool = BlockPool(8, block_size)
    seq = make_seq(pool, 12)
    assert seq.reserve(16)  # 4 blocks: one beyond the tokens (lookahead)
    seq.set_num_computed(10)
    table = seq.block_table
    seq.truncate(keep)
    kept = math.ceil(keep / block_size)
    assert seq.block_table == table[:kept]
    assert pool.num_free == 8 - kept
    for b in table[kept:]:
        assert pool.ref_count(b) == 0
    assert seq.tokens == list(range(keep))
    assert seq.num_computed == min(10, keep)
    seq.release()
    assert_pools_free(pool)


def test_sequence_keeps_pool_alive_and_returns_blocks_when_dropped():
    seq = make_seq(BlockPool(4, 4), 6)
    gc.collect()
    assert seq.reserve(6) and seq.pool.num_free == 2
    pool = seq.pool
    del seq
    gc.collect()
    assert_pools_free(pool)


def test_sequence_bad_input():
    pool = BlockPool(4, 4)
    seq = make_seq(pool, 3)
    with pytest.raises(ValueError):
        seq.append(-1)
    with pytest.raises(ValueError):
        seq.append([7, -2])
    assert seq.num_tokens == 3  # the failed append changed nothing
    for bad in (-1, 4):
        with pytest.raises(ValueError):
            seq.truncate(bad)
        with pytest.raises(ValueError):
            seq.set_num_computed(bad)
    with pytest.raises(ValueError):
        seq.blocks_needed(-1)
    with pytest.raises(ValueError):
        seq.reserve(-5)
    with pytest.raises(ValueError):
        Sequence(None)
    with pytest.raises(TypeError):
        seq.append("abc")
    assert_pools_free(pool)


# --------------------------------------------------------------------------- property test


class ModelPool:
    """Pure-Python picture of a BlockPool: which blocks are taken, and by whom."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.refs = [0] * pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.refs.count(0)


class ModelSeq:
    def __init__(self, seq: Sequence, pool: ModelPool):
        self.seq, self.pool = seq, pool
        self.tokens: list[int] = []
        self.num_computed = 0
        self.table: list[int] = []


def check_against_model(pools: list[ModelPool], seqs: list[ModelSeq]) -> None:
    owner: dict[tuple[int, int], int] = {}
    for i, s in enumerate(seqs):
        assert s.seq.tokens == s.tokens
        assert s.seq.num_computed == s.num_computed
        assert s.seq.block_table == s.table
        assert s.seq.num_reserved_slots == len(s.table) * s.pool.pool.block_size
        assert s.num_computed <= min(len(s.tokens), s.seq.num_reserved_slots)
        for b in s.table:
            key = (id(s.pool), b)
            assert key not in owner, f"block {b} owned by seqs {owner[key]} and {i}"
            owner[key] = i
    for p in pools:
        assert p.pool.num_free == p.num_free
        assert [p.pool.ref_count(b) for b in range(p.pool.num_blocks)] == p.refs
        assert p.pool.all_free() == (p.num_free == p.pool.num_blocks)


def random_op(rng: random.Random, s: ModelSeq) -> None:
    bs = s.pool.pool.block_size
    op = rng.choice(["append", "append", "reserve", "reserve", "compute", "truncate",
                     "release", "bad"])
    if op == "append":
        ids = [rng.randrange(1000) for _ in range(rng.randrange(1, 3 * bs))]
        s.seq.append(ids if len(ids) > 1 or rng.random() < 0.5 else ids[0])
        s.tokens += ids
    elif op == "reserve":
        total = rng.randrange(0, len(s.tokens) + 2 * bs + 1)
        need = max(0, math.ceil(total / bs) - len(s.table))
        assert s.seq.blocks_needed(total) == need
        ok = s.seq.reserve(total)
        assert ok == (need <= s.pool.num_free)
        if ok:
            new = s.seq.block_table[len(s.table):]
            assert s.seq.block_table[:len(s.table)] == s.table and len(new) == need
            for b in new:
                assert s.pool.refs[b] == 0, "reserve handed out a block that was not free"
                s.pool.refs[b] = 1
            s.table += new
    elif op == "compute":
        n = rng.randrange(0, min(len(s.tokens), len(s.table) * bs) + 1)
        s.seq.set_num_computed(n)
        s.num_computed = n
    elif op == "truncate":
        n = rng.randrange(0, len(s.tokens) + 1)
        s.seq.truncate(n)
        kept = math.ceil(n / bs)
        for b in s.table[kept:]:
            s.pool.refs[b] -= 1
        s.table = s.table[:kept]
        s.tokens = s.tokens[:n]
        s.num_computed = min(s.num_computed, n)
    elif op == "release":
        s.seq.release()
        for b in s.table:
            s.pool.refs[b] -= 1
        s.table, s.num_computed = [], 0
    else:  # bad input must raise and change nothing
        bad = rng.choice([
            lambda: s.seq.set_num_computed(len(s.tokens) + 1),
            lambda: s.seq.set_num_computed(len(s.table) * bs + 1)
            if len(s.table) * bs < len(s.tokens) else s.seq.truncate(-1),
            lambda: s.seq.truncate(len(s.tokens) + 1),
            lambda: s.seq.reserve(-1),
            lambda: s.pool.pool.decref(s.pool.refs.index(0)) if 0 in s.pool.refs
            else s.pool.pool.incref(-1),
            lambda: s.pool.pool.incref(s.pool.pool.num_blocks),
        ])
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("seed", range(4))
def test_sequences_match_python_model(seed):
    rng = random.Random(seed)
    pools = [ModelPool(BlockPool(rng.randrange(8, 40), rng.choice([1, 3, 4, 16])))
             for _ in range(2)]
    seqs = [ModelSeq(Sequence(p.pool), p) for p in pools for _ in range(3)]
    for _ in range(1000):
        random_op(rng, rng.choice(seqs))
        check_against_model(pools, seqs)
    for s in seqs:
        s.seq.release()
    assert_pools_free(*(p.pool for p in pools))


# --------------------------------------------------------------------------- Scheduler


class Engine:
    """The engine's side of the loop, minus the model: marks scheduled tokens computed and
    appends a sampled token to every model of a request whose last chunk ran."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.seqs: dict[int, list[Sequence]] = {}
        self.next_token = 1000

    def add(self, req_id: int, seqs: list[Sequence]) -> None:
        self.sched.add_request(req_id, seqs)
        self.seqs[req_id] = seqs

    def step(self, accepted: dict[int, int] | None = None):
        """schedule() plus bookkeeping; `accepted[r]` draft tokens of r become computed tokens."""
        step = self.sched.schedule()
        for i, r in enumerate(step.req_ids):
            seqs = self.seqs[r]
            for m, seq in enumerate(seqs):
                seq.set_num_computed(seq.num_computed + step.num_new_tokens[m][i])
            if step.is_final_chunk[i]:
                extra = (accepted or {}).get(r, 0)
                for seq in seqs:
                    computed = seq.num_tokens + extra
                    seq.append(list(range(self.next_token, self.next_token + extra + 1)))
                    seq.set_num_computed(computed)  # drafts' K/V were written in their slots
                self.next_token += extra + 1
        return step


def test_admission_is_fifo_and_respects_max_num_seqs():
    pool = BlockPool(64, 4)
    sched = Scheduler([pool], max_num_seqs=2, max_num_batched_tokens=100)
    eng = Engine(sched)
    for r in (10, 11, 12):
        eng.add(r, [make_seq(pool, 5)])
    assert sched.waiting_ids() == [10, 11, 12] and sched.num_running == 0
    step = eng.step()
    assert step.req_ids == [10, 11] and step.num_new_tokens == [[5, 5]]
    assert step.is_final_chunk == [True, True] and step.preempted == []
    assert sched.running_ids() == [10, 11] and sched.waiting_ids() == [12]
    sched.finish(10)
    step = eng.step()
    assert step.req_ids == [11, 12] and step.num_new_tokens == [[1, 5]]  # running first
    assert sched.running_ids() == [11, 12] and sched.num_waiting == 0
    for r in (11, 12):
        sched.finish(r)
    assert not sched.has_unfinished()
    assert_pools_free(pool)


def test_chunked_prefill_splits_a_long_prompt():
    pool = BlockPool(64, 4)
    sched = Scheduler([pool], max_num_seqs=4, max_num_batched_tokens=16)
    eng = Engine(sched)
    seq = make_seq(pool, 40)
    eng.add(0, [seq])
    chunks, finals = [], []
    while True:
        step = eng.step()
        chunks.append(step.num_new_tokens[0][0])
        finals.append(step.is_final_chunk[0])
        # Only the slots of what is computed so far are reserved.
        assert seq.num_reserved_slots == math.ceil(seq.num_computed / 4) * 4
        if finals[-1]:
            break
    assert chunks == [16, 16, 8] and finals == [False, False, True]
    assert seq.num_tokens == 41 and seq.num_computed == 40
    sched.finish(0)
    assert_pools_free(pool)


def test_budget_is_shared_running_first():
    pool = BlockPool(64, 4)
    sched = Scheduler([pool], max_num_seqs=4, max_num_batched_tokens=16)
    eng = Engine(sched)
    eng.add(0, [make_seq(pool, 6)])
    eng.step()
    eng.add(1, [make_seq(pool, 30)])
    eng.add(2, [make_seq(pool, 3)])
    step = eng.step()
    # 0 decodes (1 token), 1 gets a 15-token chunk, 2 must wait (no budget, FIFO kept).
    assert step.req_ids == [0, 1] and step.num_new_tokens == [[1, 15]]
    assert step.is_final_chunk == [True, False] and sched.waiting_ids() == [2]
    step = eng.step()
    assert step.req_ids == [0, 1] and step.num_new_tokens == [[1, 15]]
    assert step.is_final_chunk == [True, True]
    step = eng.step()
    assert step.req_ids == [0, 1, 2] and step.num_new_tokens == [[1, 1, 3]]
    for r in (0, 1, 2):
        sched.finish(r)
    assert_pools_free(pool)


def test_chunk_leaves_each_model_its_last_token():
    # Model 1's prompt would fit the budget, but the request is not final (model 0 is
    # chunked): model 1 keeps one token so the final step has logits from both models.
    base, nudger = BlockPool(64, 4), BlockPool(64, 4)
    sched = Scheduler([base, nudger], max_num_seqs=4, max_num_batched_tokens=10)
    eng = Engine(sched)
    eng.add(0, [make_seq(base, 25), make_seq(nudger, 6)])
    step = eng.step()
    assert step.num_new_tokens == [[10], [5]] and step.is_final_chunk == [False]
    step = eng.step()
    assert step.num_new_tokens == [[10], [0]] and step.is_final_chunk == [False]
    step = eng.step()
    assert step.num_new_tokens == [[5], [1]] and step.is_final_chunk == [True]
    sched.finish(0)
    assert_pools_free(base, nudger)


def test_lazy_nudger_catches_up_in_chunks():
    # The engine adds the nudger's sequence empty and fills it only when the nudger drafts.
    base, nudger = BlockPool(64, 4), BlockPool(64, 4)
    sched = Scheduler([base, nudger], max_num_seqs=4, max_num_batched_tokens=8)
    base_seq, nudger_seq = make_seq(base, 5), Sequence(nudger)
    sched.add_request(0, [base_seq, nudger_seq])
    step = sched.schedule()
    assert step.num_new_tokens == [[5], [0]] and step.is_final_chunk == [True]
    assert nudger.num_free == 64
    base_seq.set_num_computed(5)
    base_seq.append(1)
    nudger_seq.append(list(range(20)))  # catch-up: prompt + output at once
    sched.set_lookahead(0, [2, 1])
    news, finals = [], []
    while not finals or not finals[-1]:
        step = sched.schedule()
        news.append([step.num_new_tokens[0][0], step.num_new_tokens[1][0]])
        finals.append(step.is_final_chunk[0])
        for seq, n in zip((base_seq, nudger_seq), news[-1]):
            seq.set_num_computed(seq.num_computed + n)
    # The base keeps its newest token for the final step; both models have logits there.
    assert news == [[0, 8], [0, 8], [1, 4]] and finals == [False, False, True]
    assert base_seq.num_reserved_slots >= 6 + 2 and nudger_seq.num_reserved_slots >= 20 + 1
    batch = build_batch([base_seq], [0], 4)  # the chunk steps' base pass: an empty query
    assert batch.logits_indices.tolist() == [NO_LOGITS]
    sched.finish(0)
    assert_pools_free(base, nudger)


def test_lookahead_counts_in_budget_and_slots():
    pool = BlockPool(64, 4)
    sched = Scheduler([pool], max_num_seqs=4, max_num_batched_tokens=8)
    eng = Engine(sched)
    a, b = make_seq(pool, 4), make_seq(pool, 4)
    eng.add(0, [a])
    eng.add(1, [b])
    eng.step()  # both prefills: 4 + 4 tokens
    sched.set_lookahead(0, [3])
    sched.set_lookahead(1, [3])
    step = eng.step(accepted={0: 2})
    # 0 costs 1 + 3 = 4, 1 would cost 4 too: 8 fit exactly.
    assert step.req_ids == [0, 1] and step.is_final_chunk == [True, True]
    assert step.num_new_tokens == [[1, 1]]
    assert b.num_reserved_slots >= 5 + 3 and len(b.block_table) == 2
    assert a.num_tokens == 8 and a.num_computed == 7  # 2 drafts accepted + 1 sampled
    sched.set_lookahead(0, [6])
    step = eng.step()
    # 0 costs 1 + 6 = 7; 1 (cost 4) does not fit the 1 left, and a chunk would leave nothing.
    assert step.req_ids == [0] and step.preempted == [] and sched.running_ids() == [0, 1]
    assert a.num_reserved_slots >= 8 + 6
    for r in (0, 1):
        sched.finish(r)
    assert_pools_free(pool)


def test_preempts_newest_and_readmits_it_later():
    pool = BlockPool(4, 4)  # 16 slots
    sched = Scheduler([pool], max_num_seqs=4, max_num_batched_tokens=64)
    eng = Engine(sched)
    a, b = make_seq(pool, 7), make_seq(pool, 6)
    eng.add(0, [a])
    eng.add(1, [b])
    step = eng.step()
    assert step.req_ids == [0, 1] and pool.num_free == 0
    step = eng.step()  # a: 8 tokens (fits 2 blocks), b: 7
    assert step.preempted == []
    step = eng.step()  # a needs a 3rd block: the newest (b) goes
    assert step.preempted == [1] and step.req_ids == [0]
    assert b.num_computed == 0 and b.block_table == [] and b.num_tokens == 8
    assert sched.waiting_ids() == [1] and sched.running_ids() == [0]
    while a.num_tokens < 12:
        step = eng.step()
        assert step.req_ids == [0] and 1 not in step.req_ids  # b cannot fit while a grows
    sched.finish(0)
    step = eng.step()
    assert step.req_ids == [1] and step.num_new_tokens == [[8]]  # recomputed from scratch
    assert step.is_final_chunk == [True]
    sched.finish(1)
    assert_pools_free(pool)


def test_preempts_itself_when_it_is_the_newest():
    pool = BlockPool(5, 4)
    sched = Scheduler([pool], max_num_seqs=4, max_num_batched_tokens=64)
    eng = Engine(sched)
    a, b = make_seq(pool, 8), make_seq(pool, 8)
    eng.add(0, [a])
    eng.add(1, [b])
    eng.step()  # 2 + 2 blocks, 1 free
    step = eng.step()  # a takes the free block; b finds none and is the newest
    assert step.req_ids == [0] and step.preempted == [1]
    assert sched.running_ids() == [0] and sched.waiting_ids() == [1]
    assert pool.num_free == 5 - 3
    sched.abort(0)
    step = eng.step()
    assert step.req_ids == [1] and step.num_new_tokens == [[9]]
    sched.finish(1)
    assert_pools_free(pool)


def test_two_pools_of_different_sizes():
    base, nudger = BlockPool(100, 16), BlockPool(3, 4)
    sched = Scheduler([base, nudger], max_num_seqs=8, max_num_batched_tokens=256)
    eng = Engine(sched)
    eng.add(0, [make_seq(base, 20), make_seq(nudger, 6)])
    eng.add(1, [make_seq(base, 20), make_seq(nudger, 6)])
    step = eng.step()
    # Room for both in the base pool, but the nudger pool has 3 blocks: only 0 goes in.
    assert step.req_ids == [0] and step.num_new_tokens == [[20], [6]]
    assert sched.waiting_ids() == [1]
    sched.finish(0)
    step = eng.step()
    assert step.req_ids == [1] and step.is_final_chunk == [True]
    sched.finish(1)
    assert_pools_free(base, nudger)


def test_reserve_across_pools_leaks_nothing():
    # The newest request needs a block from both pools; the base pool has room, the nudger
    # pool does not: it must preempt itself without keeping a new base block.
    base, nudger = BlockPool(10, 4), BlockPool(2, 4)
    sched = Scheduler([base, nudger], max_num_seqs=8, max_num_batched_tokens=64)
    eng = Engine(sched)
    eng.add(0, [make_seq(base, 5), make_seq(nudger, 3)])
    eng.add(1, [make_seq(base, 4), make_seq(nudger, 4)])
    eng.step()
    assert sched.running_ids() == [0, 1] and base.num_free == 7 and nudger.num_free == 0
    step = eng.step()  # 0 fits its blocks; 1 needs a 2nd block in each pool
    assert step.req_ids == [0] and step.preempted == [1]
    assert base.num_free == 8 and nudger.num_free == 1
    sched.finish(0)
    step = eng.step()
    assert step.req_ids == [1] and step.num_new_tokens == [[5], [5]]
    sched.finish(1)
    assert_pools_free(base, nudger)


def test_shared_pool_counts_both_models():
    pool = BlockPool(3, 4)
    sched = Scheduler([pool, pool], max_num_seqs=4, max_num_batched_tokens=64)
    eng = Engine(sched)
    eng.add(0, [make_seq(pool, 4), make_seq(pool, 4)])
    eng.add(1, [make_seq(pool, 4), make_seq(pool, 4)])
    step = eng.step()
    assert step.req_ids == [0] and pool.num_free == 1
    with pytest.raises(ValueError, match="blocks"):
        sched.add_request(2, [make_seq(pool, 8), make_seq(pool, 8)])  # 4 blocks > 3
    for r in (0, 1):
        sched.finish(r)
    assert_pools_free(pool)


def test_abort_and_finish_from_both_queues():
    pool = BlockPool(64, 4)
    sched = Scheduler([pool], max_num_seqs=2, max_num_batched_tokens=64)
    eng = Engine(sched)
    for r in range(5):
        eng.add(r, [make_seq(pool, 5)])
    eng.step()
    assert sched.running_ids() == [0, 1] and sched.waiting_ids() == [2, 3, 4]
    sched.abort(3)  # waiting
    sched.finish(2)  # waiting
    sched.abort(1)  # running
    assert sched.running_ids() == [0] and sched.waiting_ids() == [4]
    assert not sched.has_request(1) and sched.has_request(4)
    assert pool.num_free == 64 - 2
    step = eng.step()
    assert step.req_ids == [0, 4]
    sched.finish(0)
    sched.finish(4)
    assert not sched.has_unfinished() and sched.num_running == sched.num_waiting == 0
    with pytest.raises(ValueError, match="unknown request"):
        sched.finish(0)
    assert_pools_free(pool)


def test_scheduler_bad_input():
    pool, other = BlockPool(4, 4), BlockPool(4, 4)
    for args in (([], 1, 1), ([pool], 0, 8), ([pool], 1, 0), ([pool, None], 1, 8)):
        with pytest.raises(ValueError):
            Scheduler(*args)
    sched = Scheduler([pool], max_num_seqs=4, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="blocks"):
        sched.add_request(0, [make_seq(pool, 17)])  # 5 blocks > 4
    with pytest.raises(ValueError, match="one Sequence per pool"):
        sched.add_request(0, [make_seq(pool, 3), make_seq(pool, 3)])
    with pytest.raises(ValueError, match="pool"):
        sched.add_request(0, [make_seq(other, 3)])
    with pytest.raises(ValueError, match="no pending"):
        sched.add_request(0, [Sequence(pool)])
    seq = make_seq(pool, 3)
    sched.add_request(0, [seq])
    with pytest.raises(ValueError, match="already exists"):
        sched.add_request(0, [make_seq(pool, 3)])
    with pytest.raises(ValueError, match="only one request"):
        sched.add_request(1, [seq])
    for lookahead in ([-1], [1, 1], [8], [14]):
        with pytest.raises(ValueError):
            sched.set_lookahead(0, lookahead)
    with pytest.raises(ValueError, match="unknown request"):
        sched.set_lookahead(9, [1])
    with pytest.raises(ValueError, match="unknown request"):
        sched.abort(9)
    # A request that outgrew its pool is reported, not scheduled into a livelock.
    seq.append(list(range(20)))
    with pytest.raises(RuntimeError, match="blocks"):
        sched.schedule()
    sched.abort(0)
    assert sched.schedule().req_ids == []
    assert_pools_free(pool, other)


@pytest.mark.parametrize("seed", range(3))
def test_random_workload_invariants(seed):
    """Random prompts, lookaheads and lengths on two small pools, run to completion."""
    rng = random.Random(seed)
    bs0, bs1 = rng.choice([4, 16]), rng.choice([2, 4])
    base, nudger = BlockPool(rng.randrange(8, 16), bs0), BlockPool(rng.randrange(12, 24), bs1)
    max_seqs, budget = rng.randrange(2, 6), rng.randrange(4, 24)
    sched = Scheduler([base, nudger], max_seqs, budget)
    eng = Engine(sched)
    target: dict[int, int] = {}
    added = finished = 0
    for _ in range(3000):
        if added < 40 and rng.random() < 0.3:
            cap = min(base.num_blocks * bs0, nudger.num_blocks * bs1) - 8
            n = rng.randrange(1, cap // 2)
            eng.add(added, [make_seq(base, n), make_seq(nudger, rng.randrange(1, n + 1))])
            target[added] = min(cap, n + rng.randrange(1, 30))
            added += 1
        for r in sched.running_ids():
            if rng.random() < 0.3:
                sched.set_lookahead(r, [rng.randrange(0, min(3, budget)) for _ in range(2)])
        before = {r: [s.num_computed for s in eng.seqs[r]] for r in sched.running_ids()}
        accepted = {r: rng.randrange(0, 2) for r in sched.running_ids()}
        # Accept drafts only up to what the request reserved for them.
        step = eng.sched.schedule()
        cost = 0
        assert len(step.req_ids) <= max_seqs and len(set(step.req_ids)) == len(step.req_ids)
        for i, r in enumerate(step.req_ids):
            seqs = eng.seqs[r]
            news = [step.num_new_tokens[m][i] for m in range(2)]
            pending = [s.num_tokens - s.num_computed for s in seqs]
            assert all(0 <= n <= p for n, p in zip(news, pending)) and max(news) > 0
            assert step.is_final_chunk[i] == (news == pending)
            if r in before:
                assert [s.num_computed for s in seqs] == before[r]  # running, not preempted
            cost += max(news)
        assert cost <= budget
        for r in step.preempted:
            assert r not in step.req_ids and r in sched.waiting_ids()
            assert all(s.num_computed == 0 and s.block_table == [] for s in eng.seqs[r])
        # Bookkeeping (as Engine.step does), with drafts capped by the reserved slots.
        for i, r in enumerate(step.req_ids):
            seqs = eng.seqs[r]
            for m, s in enumerate(seqs):
                s.set_num_computed(s.num_computed + step.num_new_tokens[m][i])
            if step.is_final_chunk[i]:
                extra = min([accepted.get(r, 0)] +
                            [s.num_reserved_slots - s.num_tokens for s in seqs])
                for s in seqs:
                    computed = s.num_tokens + extra
                    s.append([7] * (extra + 1))
                    s.set_num_computed(computed)
                if seqs[0].num_tokens >= target[r]:
                    sched.finish(r)
                    finished += 1
        held0 = sum(len(s[0].block_table) for s in eng.seqs.values())
        held1 = sum(len(s[1].block_table) for s in eng.seqs.values())
        assert base.num_free == base.num_blocks - held0
        assert nudger.num_free == nudger.num_blocks - held1
        if added == 40 and not sched.has_unfinished():
            break
    assert finished == 40, (finished, sched.running_ids(), sched.waiting_ids())
    assert_pools_free(base, nudger)


# --------------------------------------------------------------------------- build_batch


def reference_batch(seqs, num_new, block_size):
    ids, pos, slots, qsl, lens, logits = [], [], [], [0], [], []
    for s, n in zip(seqs, num_new):
        tokens, table, start = s.tokens, s.block_table, s.num_computed
        for p in range(start, start + n):
            ids.append(tokens[p])
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + n)
        lens.append(start + n)
        logits.append(qsl[-1] - 1 if n else NO_LOGITS)
    width = max([1] + [len(s.block_table) for s in seqs])
    tables = [s.block_table + [NO_BLOCK] * (width - len(s.block_table)) for s in seqs]
    return dict(input_ids=ids, positions=pos, slot_mapping=slots, query_start_loc=qsl,
                seq_lens=lens, logits_indices=logits,
                block_tables=np.array(tables, dtype=np.int32).reshape(len(seqs), width))


DTYPES = dict(input_ids=np.int64, positions=np.int64, slot_mapping=np.int64,
              query_start_loc=np.int32, seq_lens=np.int32, block_tables=np.int32,
              logits_indices=np.int64)


@pytest.mark.parametrize("seed", range(20))
def test_build_batch_matches_reference(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 16])
    pool = BlockPool(400, block_size)
    seqs = [make_seq(pool, rng.randrange(1, 60), first_token=100 * i)
            for i in range(rng.randrange(1, 9))]
    # Grow the tables in turns so each one's blocks are scattered through the pool.
    for grow in range(1, 70):
        for s in seqs:
            if rng.random() < 0.7:
                assert s.reserve(min(grow * block_size, s.num_tokens + rng.randrange(0, 5)))
    num_new = []
    for s in seqs:
        assert s.reserve(s.num_tokens)
        s.set_num_computed(rng.randrange(0, s.num_tokens + 1))
        # 0 new tokens: a model that only waits for the other model's chunk (empty query).
        num_new.append(rng.randrange(0, s.num_tokens - s.num_computed + 1))
    batch = build_batch(seqs, num_new, block_size)
    ref = reference_batch(seqs, num_new, block_size)
    for name, dtype in DTYPES.items():
        arr = getattr(batch, name)
        assert isinstance(arr, np.ndarray) and arr.dtype == dtype, name
        np.testing.assert_array_equal(arr, np.asarray(ref[name], dtype=dtype), err_msg=name)
    assert batch.num_tokens == sum(num_new) and batch.num_seqs == len(seqs)
    assert batch.max_query_len == max(num_new)
    if batch.num_tokens:
        assert (batch.input_ids[batch.logits_indices[batch.logits_indices >= 0]] ==
                [s.tokens[s.num_computed + n - 1] for s, n in zip(seqs, num_new) if n]).all()
    assert batch.max_seq_len == max(ref["seq_lens"])
    for s in seqs:
        s.release()
    assert_pools_free(pool)


def test_build_batch_arrays_wrap_into_torch_without_copy():
    pool = BlockPool(16, 4)
    seqs = [make_seq(pool, 9), make_seq(pool, 3)]
    for s in seqs:
        s.reserve(s.num_tokens)
    batch = build_batch(seqs, [9, 3], 4)
    torch_dtypes = dict(input_ids=torch.int64, positions=torch.int64, slot_mapping=torch.int64,
                        query_start_loc=torch.int32, seq_lens=torch.int32,
                        block_tables=torch.int32, logits_indices=torch.int64)
    for name, dtype in torch_dtypes.items():
        arr = getattr(batch, name)
        t = torch.from_numpy(arr)
        assert t.dtype == dtype and t.data_ptr() == arr.ctypes.data, name
        assert arr.flags.c_contiguous
    with pytest.raises(AttributeError):
        batch.input_ids = np.zeros(3)
    # The arrays own their memory: they outlive the BatchArrays and the next build.
    ids = torch.from_numpy(batch.input_ids)
    del batch
    build_batch(seqs, [1, 1], 4)
    gc.collect()
    assert ids.tolist() == list(range(9)) + list(range(3))
    assert build_batch([], [], 4).block_tables.shape == (0, 1)
    for s in seqs:
        s.release()
    assert_pools_free(pool)


def test_build_batch_bad_input():
    pool = BlockPool(8, 4)
    seq = make_seq(pool, 6)
    seq.reserve(4)  # slots for 4 of the 6 tokens
    seq.set_num_computed(2)
    cases = [
        ([seq], [5]),      # beyond the tokens
        ([seq], [3]),      # beyond the reserved slots
        ([seq], [-1]),
        ([seq], [1, 1]),   # length mismatch
        ([None], [1]),
    ]
    for seqs, num_new in cases:
        with pytest.raises(ValueError):
            build_batch(seqs, num_new, 4)
    for block_size in (0, -4, 8):
        with pytest.raises(ValueError):
            build_batch([seq], [1], block_size)
    assert build_batch([seq], [2], 4).slot_mapping.tolist() == [seq.block_table[0] * 4 + 2,
                                                               seq.block_table[0] * 4 + 3]
    empty = build_batch([seq], [0], 4)  # allowed: an empty query, and no logits row
    assert empty.num_tokens == 0 and empty.logits_indices.tolist() == [NO_LOGITS]
    assert empty.query_start_loc.tolist() == [0, 0] and empty.seq_lens.tolist() == [2]
    seq.release()
    assert_pools_free(pool)


# ---------------------------------------------------------------- prefix caching
def test_prefix_cache_shares_full_computed_blocks_and_keeps_freed_ones_until_needed():
    pool = _core.BlockPool(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a = _core.Sequence(pool)
    a.append(list(range(1, 11)))                    # 10 tokens: two full blocks and a partial one
    assert a.reserve(10)
    a.set_num_computed(10)
    assert pool.num_cached == 2 and [pool.is_cached(b) for b in a.block_table] == [True, True, False]
    b = _core.Sequence(pool)
    b.append(list(range(1, 9)) + [99])              # shares both full blocks
    assert b.match_cached_prefix() == 8 and b.num_computed == 8
    assert b.block_table == a.block_table[:2] and [pool.ref_count(x) for x in b.block_table] == [2, 2]
    c = _core.Sequence(pool)
    c.append(list(range(1, 9)))                     # 8 tokens: the last one must stay to compute
    assert c.match_cached_prefix() == 4
    shared = a.block_table[:2]
    a.release(), b.release(), c.release()
    assert pool.all_free() and pool.num_evictable == 2 and pool.num_cached == 2
    # The free list goes first; the cached blocks are taken back last, least recently used first.
    grab = _core.Sequence(pool)
    assert grab.reserve(4 * 4) and set(grab.block_table).isdisjoint(shared)
    assert grab.reserve(5 * 4) and grab.block_table[-1] == shared[1]   # unreferenced first (b let go)
    assert pool.prefix_cache_evictions == 1 and pool.num_cached == 1


def test_provisional_drafts_are_cached_only_once_overwrite_gives_their_values():
    """Drafts picked on the device sit on the host as placeholders (0) until the walk's read: a block
    holding one must not be cached under the placeholder's hash, or a prompt that really holds 0s
    there would take K/V computed for other tokens."""
    pool = _core.BlockPool(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = _core.Sequence(pool)
    a.append([5, 6, 7])
    a.append_provisional([0, 0, 0])                 # block 0 ends with a draft, block 1 starts with two
    assert a.reserve(6)
    a.set_num_computed(6)
    assert pool.num_cached == 0
    probe = _core.Sequence(pool)
    probe.append([5, 6, 7, 0, 1])
    assert probe.match_cached_prefix() == 0
    a.overwrite(3, [8, 9, 10])                      # the walk's values: block 0 is now known and computed
    assert pool.num_cached == 1 and pool.is_cached(a.block_table[0])
    hit = _core.Sequence(pool)
    hit.append([5, 6, 7, 8, 1])
    assert hit.match_cached_prefix() == 4
    a.truncate(4)                                   # rejected drafts roll back
    a.append_provisional([0, 0, 0, 0])
    assert a.reserve(8)
    a.set_num_computed(8)
    assert pool.num_cached == 1                     # block 1 waits for its values
    a.overwrite(4, [1, 2])                          # only part: block 1 still holds placeholders
    assert pool.num_cached == 1
    a.overwrite(6, [3, 4])
    assert pool.num_cached == 2
    for seq in (a, probe, hit):
        seq.release()
    assert pool.all_free()


def test_prefix_cache_off_registers_nothing_and_matches_nothing():
    pool = _core.BlockPool(num_blocks=4, block_size=2)
    a = _core.Sequence(pool)
    a.append([1, 2, 3, 4, 5])
    assert a.reserve(5)
    a.set_num_computed(5)
    b = _core.Sequence(pool)
    b.append([1, 2, 3, 4, 5])
    assert pool.num_cached == 0 and b.match_cached_prefix() == 0 and b.block_table == []


def test_rollback_into_a_shared_block_never_writes_it():
    pool = _core.BlockPool(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a, b = _core.Sequence(pool), _core.Sequence(pool)
    a.append(list(range(1, 10)))
    assert a.reserve(9)
    a.set_num_computed(9)                           # drafts included: blocks 0 and 1 registered
    b.append(list(range(1, 10)))
    assert b.match_cached_prefix() == 8
    a.truncate(6)                                   # a rejected drafts inside the shared block 1
    assert a.block_table == b.block_table[:1] and a.num_computed == 4 and a.num_tokens == 6
    assert pool.ref_count(b.block_table[1]) == 1 and pool.is_cached(b.block_table[1])
    b.truncate(6)                                   # now b holds block 1 alone: it stops being cached
    assert b.num_computed == 6 and not pool.is_cached(b.block_table[1]) and pool.num_cached == 1


def _slot(table, p, bs):
    return table[p // bs] * bs + p % bs


class _PoolModel:
    """The obvious pool: a free stack, an LRU list of unreferenced cached blocks, a dict of cached prefixes."""

    def __init__(self, n):
        self.free, self.ref, self.lru = list(range(n - 1, -1, -1)), [0] * n, []
        self.key_of, self.by_key = {}, {}

    def num_free(self):
        return len(self.free) + len(self.lru)

    def allocate(self):
        b = self.free.pop() if self.free else self.lru.pop(0)
        self.by_key.pop(self.key_of.pop(b, None), None)
        self.ref[b] = 1
        return b

    def decref(self, b):
        self.ref[b] -= 1
        if self.ref[b] == 0:
            (self.lru if b in self.key_of else self.free).append(b)

    def acquire(self, key):
        b = self.by_key.get(key)
        if b is not None:
            if self.ref[b] == 0:
                self.lru.remove(b)
            self.ref[b] += 1
        return b

    def register(self, b, key):
        if b not in self.key_of and key not in self.by_key:
            self.key_of[b], self.by_key[key] = key, b

    def unregister(self, b):
        if b in self.key_of:
            del self.by_key[self.key_of.pop(b)]

    def reset(self):
        for b in self.lru:
            del self.by_key[self.key_of.pop(b)]
        self.free.extend(self.lru)
        self.lru = []


class _SeqModel:
    def __init__(self, pool, bs):
        self.pool, self.bs, self.tokens, self.table, self.computed, self.hashed = pool, bs, [], [], 0, 0

    def key(self, i):
        return tuple(self.tokens[:(i + 1) * self.bs])

    def free_from(self, keep):
        self.hashed = min(self.hashed, keep)
        while len(self.table) > keep:
            self.pool.decref(self.table.pop())

    def invalidate_from(self, pos):
        first = pos // self.bs
        for i in range(first, min(self.hashed, len(self.table))):
            if self.pool.ref[self.table[i]] > 1:
                self.free_from(i)
                break
            self.pool.unregister(self.table[i])
        self.hashed = min(self.hashed, first)

    def set_computed(self, n):
        if n < self.computed:
            self.invalidate_from(n)
        self.computed = min(n, len(self.table) * self.bs)
        for i in range(self.hashed, self.computed // self.bs):
            self.pool.register(self.table[i], self.key(i))
        self.hashed = max(self.hashed, self.computed // self.bs)

    def truncate(self, n):
        self.tokens = self.tokens[:n]
        keep = -(-n // self.bs)
        if keep < len(self.table):
            self.free_from(keep)
        if self.computed > n:
            self.invalidate_from(n)
            self.computed = min(n, len(self.table) * self.bs)

    def reserve(self, total):
        need = max(0, -(-total // self.bs) - len(self.table))
        if need > self.pool.num_free():
            return False
        self.table += [self.pool.allocate() for _ in range(need)]
        return True

    def match(self):
        if self.table or self.computed:
            return 0
        for i in range((len(self.tokens) - 1) // self.bs if self.tokens else 0):
            b = self.pool.acquire(self.key(i))
            if b is None:
                break
            self.table.append(b)
        self.computed = self.hashed = len(self.table)
        self.computed *= self.bs
        return self.computed


def test_prefix_cache_pool_against_a_python_model_over_random_operations():
    """Random allocate / share (match) / compute / rollback / free / evict on real sequences and on the
    Python model: same blocks, counts and cache; and every computed slot of every live sequence holds
    the K/V of its own context (a shared block is never overwritten; a cached block is never stale)."""
    rng = random.Random(19)
    bs, n_blocks = 4, 14
    pool = _core.BlockPool(n_blocks, bs, enable_prefix_caching=True)
    model = _PoolModel(n_blocks)
    stems = [[rng.randrange(1, 5) for _ in range(16)] for _ in range(3)]
    kv = {}                                          # slot -> the context whose K/V it holds
    live = []                                        # (real, model)
    hits = 0
    for _ in range(4000):
        op = rng.random()
        if op < 0.12 or not live:
            real, mod = _core.Sequence(pool), _SeqModel(model, bs)
            toks = rng.choice(stems)[: rng.randrange(1, 17)] + [rng.randrange(1, 5) for _ in range(rng.randrange(0, 4))]
            real.append(toks)
            mod.tokens = list(toks)
            live.append((real, mod))
            continue
        real, mod = live[rng.randrange(len(live))]
        if op < 0.30:
            got = real.match_cached_prefix()
            assert got == mod.match()
            hits += got
        elif op < 0.55:
            if mod.computed < len(mod.tokens):
                new = mod.computed + rng.randrange(1, len(mod.tokens) - mod.computed + 1)
                ok = real.reserve(new)
                assert ok == mod.reserve(new)
                if ok:
                    for p in range(mod.computed, new):
                        kv[_slot(mod.table, p, bs)] = tuple(mod.tokens[:p + 1])
                    real.set_num_computed(new)
                    mod.set_computed(new)
        elif op < 0.67:
            toks = [rng.randrange(1, 5) for _ in range(rng.randrange(1, 4))]
            real.append(toks)
            mod.tokens += toks
        elif op < 0.79:
            n = rng.randrange(0, len(mod.tokens) + 1)
            real.truncate(n)
            mod.truncate(n)
        elif op < 0.85:
            n = rng.randrange(0, mod.computed + 1)
            real.set_num_computed(n)
            mod.set_computed(n)
        elif op < 0.90:
            real.release()
            mod.free_from(0)
            mod.computed = 0
        elif op < 0.99:
            live.remove((real, mod))
            del real                                 # the destructor gives the blocks back, newest first
            for b in reversed(mod.table):
                model.decref(b)
        else:
            pool.reset_prefix_cache()
            model.reset()
        for real, mod in live:
            assert (real.block_table, real.num_computed, real.tokens) == (mod.table, mod.computed, mod.tokens)
            for p in range(mod.computed):
                assert kv[_slot(mod.table, p, bs)] == tuple(mod.tokens[:p + 1]), "a computed slot was overwritten"
        assert (pool.num_free, pool.num_evictable, pool.num_cached) == (model.num_free(), len(model.lru),
                                                                        len(model.key_of))
        assert [pool.ref_count(b) for b in range(n_blocks)] == model.ref
    assert hits > 200 and pool.prefix_cache_evictions > 20
    live.clear()
    assert pool.all_free()


def test_scheduler_takes_cached_prefixes_at_admission_gives_them_back_when_it_cannot_admit():
    pool = BlockPool(8, 4, enable_prefix_caching=True)
    sched = Scheduler([pool], max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq(pool, 10, first_token=1)
    sched.add_request(0, [a])
    assert sched.schedule().num_new_tokens == [[10]]
    a.set_num_computed(10)
    sched.finish(0)
    assert pool.all_free() and pool.num_cached == 2
    c = make_seq(pool, 20, first_token=100)           # runs on, holding 5 blocks
    sched.add_request(1, [c])
    assert sched.schedule().num_new_tokens == [[20]]
    c.set_num_computed(20)
    d = make_seq(pool, 17, first_token=1)             # 2 cached blocks + 3 new: only 1 other block is free
    sched.add_request(2, [d])
    step = sched.schedule()
    assert step.req_ids == [] and sched.waiting_ids() == [2]
    assert d.block_table == [] and d.num_computed == 0 and pool.num_evictable == 2
    assert (pool.prefix_cache_hit_tokens, pool.prefix_cache_query_tokens) == (0, 30)   # a and c looked up
    sched.finish(1)
    step = sched.schedule()
    assert step.req_ids == [2] and step.num_new_tokens == [[9]] and d.num_computed == 8
    assert (pool.prefix_cache_hit_tokens, pool.prefix_cache_query_tokens) == (8, 47)
    sched.finish(2)
    assert pool.all_free()


def test_a_caching_pool_serves_one_model_only():
    shared = BlockPool(4, 2)
    Scheduler([shared, shared], max_num_seqs=1, max_num_batched_tokens=8)     # fine without caching
    caching = BlockPool(4, 2, enable_prefix_caching=True)
    with pytest.raises(ValueError, match="one model only"):
        Scheduler([caching, caching], max_num_seqs=1, max_num_batched_tokens=8)
