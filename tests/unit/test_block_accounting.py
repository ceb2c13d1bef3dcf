"""Block accounting under random add/step/abort sequences (scheduler + KV manager, no model)."""

import hypothesis.strategies as st
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from slimserve.config import SchedulerConfig
from slimserve.core.request import Request
from slimserve.engine.scheduler import Scheduler
from slimserve.kv_cache.block_pool import BlockPool, FreeBlockQueue
from slimserve.kv_cache.manager import KVCacheManager
from slimserve.kv_cache.spec import FULL, AttentionSpec
from slimserve.kv_cache.tiers import DiskTier
from slimserve.sampling_params import SamplingParams

NUM_BLOCKS, BS = 24, 4


class EngineBookkeeping(RuleBasedStateMachine):
    """Drives the scheduler as the engine does, with a fake model that emits token 7."""

    GROUPS = (FULL,)

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BS, enable_prefix_caching=True, groups=self.GROUPS)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10), self.kv)
        self.live: dict[str, Request] = {}
        self.n = 0

    @rule(
        prefix=st.sampled_from([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], []]),
        extra=st.lists(st.integers(0, 50), min_size=1, max_size=20),
        max_tokens=st.integers(1, 12),
    )
    def add(self, prefix, extra, max_tokens):
        self._add(prefix + extra, SamplingParams(max_tokens=max_tokens))

    def _add(self, ids, params):
        total = self.kv.blocks_needed(len(ids) + params.max_tokens)
        if total * len(self.GROUPS) > NUM_BLOCKS:
            return  # the engine refuses these up front
        self.n += 1
        req = Request(f"r{self.n}", None, ids, params, frozenset())
        self.live[req.request_id] = req
        self.sched.add(req)

    @precondition(lambda self: self.live)
    @rule()
    def step(self):
        out = self.sched.schedule()
        for req, n in out.scheduled:
            assert n >= 1
            assert req.num_computed_tokens + n <= req.num_tokens
            for g, table in enumerate(self.kv.req_blocks[req.request_id]):
                assert len(table) * BS >= req.num_computed_tokens + n
                first = self.kv.first_needed(g, req.num_computed_tokens)
                assert None not in table[first:]  # every block a row of the step reads
                w = self.GROUPS[g].window
                if w:  # a window group holds only what its window and the step's rows see
                    assert sum(b is not None for b in table) <= (w + n - 2) // BS + 2
        self._commit_and_emit(out)

    def _commit_and_emit(self, out, between=lambda: None):
        """Credit every scheduled row (no drafts: all accepted), run `between` (what a runner
        does after the forward), then draw token 7 for each request its step completed."""
        for req, n in out.scheduled:
            self.sched.commit(req, req.num_computed_tokens + n)
        between()
        for req, _ in out.scheduled:
            if req.num_computed_tokens == req.num_tokens:
                req.append_token(7)
                if req.num_output_tokens >= req.params.max_tokens:
                    self.sched.finish(req, "length")
                    del self.live[req.request_id]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.sched.finish(self.live.pop(rid), "abort")

    @invariant()
    def ref_counts_match_holders(self):
        holders = {}
        for tables in self.kv.req_blocks.values():
            for b in (b for t in tables for b in t if b is not None):
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        for session in self.kv.sessions.values():  # a kept session holds a reference too
            for b in session.blocks:
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        assert self.kv.num_pinned == sum(len(x.blocks) for x in self.kv.sessions.values())
        free_ids = {b.block_id for b in self.kv.pool.free_queue}
        cached_free = sum(b.block_hash is not None for b in self.kv.pool.free_queue)
        assert self.kv.pool.num_free_cached == cached_free
        for b in self.kv.pool.blocks:
            assert b.ref_cnt >= 0
            assert b.ref_cnt == holders.get(b.block_id, 0)
            assert (b.ref_cnt == 0) == (b.block_id in free_ids)
        assert self.kv.num_free_blocks == len(free_ids)

    def teardown(self):
        for req in list(self.live.values()):
            self.sched.finish(req, "abort")
        self.kv.expire_sessions(float("inf"))
        assert self.kv.num_free_blocks == NUM_BLOCKS  # no leak
        assert not self.kv.req_blocks


EngineBookkeeping.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestBlockAccounting = EngineBookkeeping.TestCase


class WindowBookkeeping(EngineBookkeeping):
    """The same with a full group and two 6-token window groups (as Gemma 3's layers are)."""

    GROUPS = (FULL, AttentionSpec("sliding", 6), AttentionSpec("sliding", 6))


WindowBookkeeping.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestWindowBlockAccounting = WindowBookkeeping.TestCase


class TierBookkeeping(EngineBookkeeping):
    """The same over a disk tier, with a fake runner whose pages are their blocks' tokens: the
    page movements the scheduler hands out put the right tokens in every block a request reads,
    whether its blocks were computed, shared from RAM, or loaded from disk (after RAM forgot)."""

    def __init__(self):
        import shutil
        import tempfile

        from tests.unit.test_kv_tiers import PAGE, FakeRunner

        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.cleanup = lambda: shutil.rmtree(self.dir, ignore_errors=True)
        self.tier = DiskTier(self.dir, 1 << 20, PAGE)
        self.kv = KVCacheManager(NUM_BLOCKS, BS, salt=b"t" * 16, tier=self.tier)
        self.sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=10), self.kv)
        self.runner = FakeRunner()

    @precondition(lambda self: self.live)
    @rule()
    def step(self):
        out = self.sched.schedule()
        self.runner.execute_kv_ops(out.kv_ops, self.sched.kv_saved)
        for req, n in out.scheduled:
            self.runner.compute(
                self.kv, req.request_id, req.all_token_ids, req.num_computed_tokens,
                req.num_computed_tokens + n,
            )  # fmt: skip
        self._commit_and_emit(out, self._save)

    def _save(self):
        self.runner.execute_kv_ops(self.sched.take_kv_ops(), self.sched.kv_saved)
        self.tier.flush()

    @rule(
        extra=st.lists(st.integers(0, 50), min_size=5, max_size=20),
        max_tokens=st.integers(12, 30),
    )
    def add_long(self, extra, max_tokens):
        """Long answers: running requests outgrow the pool and are preempted, so their blocks,
        the partial last one included, come back from RAM or disk."""
        self._add([1, 2, 3, 4, 5, 6, 7, 8] + extra, SamplingParams(max_tokens=max_tokens))

    @rule()
    def forget_ram_cache(self):
        self.kv.reset_prefix_cache()

    @invariant()
    def pages_hold_their_tokens(self):
        from tests.unit.test_kv_tiers import page_of

        for req in self.sched.running:
            table = self.kv.block_ids(req.request_id)
            n = req.num_computed_tokens
            for i in range(-(-n // BS)):  # a partial last block: its computed tokens
                upto = min(BS, n - i * BS)
                page = self.runner.pages[table[i]][: 4 * upto]
                want = (req.all_token_ids[i * BS : (i + 1) * BS] + [0] * BS)[:BS]
                assert page == page_of(want)[: 4 * upto], (req.request_id, i)

    def teardown(self):
        super().teardown()
        self.tier.close()
        self.cleanup()


TierBookkeeping.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestTierBlockAccounting = TierBookkeeping.TestCase


class SessionBookkeeping(EngineBookkeeping):
    """The same with agent sessions kept between turns: requests carry one of three session ids,
    a finished one's blocks stay pinned until its session expires or the pool runs short."""

    def __init__(self):
        super().__init__()
        self.sched.session_ttl = 1e9

    @rule(
        prefix=st.sampled_from([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], []]),
        extra=st.lists(st.integers(0, 50), min_size=1, max_size=20),
        max_tokens=st.integers(1, 12),
        session=st.sampled_from(["s1", "s2", "s3"]),
    )
    def add_in_session(self, prefix, extra, max_tokens, session):
        self._add(prefix + extra, SamplingParams(max_tokens=max_tokens, session_id=session))

    @rule()
    def sessions_expire(self):
        self.kv.expire_sessions(float("inf"))
        assert not self.kv.sessions and self.kv.num_pinned == 0


SessionBookkeeping.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestSessionBlockAccounting = SessionBookkeeping.TestCase


def test_window_groups_give_back_blocks_and_hit_only_what_they_hold():
    win = AttentionSpec("sliding", 6)
    kv = KVCacheManager(NUM_BLOCKS, BS, groups=(FULL, win))
    ids = list(range(40))
    assert kv.allocate_slots("a", 24, num_computed=0)
    kv.cache_full_blocks("a", ids, 24)
    assert kv.allocate_slots("a", 25, num_computed=24)  # position 24 sees 19..24: blocks 4-6
    full, window = kv.tables("a")
    assert len(full) == len(window) == 7 and 0 not in full
    assert window[:4] == [0] * 4 and 0 not in window[4:]
    assert kv.num_held("a") == 7 + 3
    # Another request with the same 24 tokens: 5 blocks hit (the last token is recomputed).
    hit = kv.find_prefix(ids[:24])
    assert hit.num_tokens == 20 and len(hit.blocks) == 5
    (wblocks,) = hit.others
    assert wblocks[:3] == [None] * 3 and None not in wblocks[3:]  # 20 sees 15..20: blocks 3-5
    # Blocks 0-3 of the window group were given back and may be reused: after they are, no hit
    # may reach past what the window group still holds.
    kv.free("a")
    assert kv.allocate_slots("b", (NUM_BLOCKS - 2) * BS // 2, num_computed=0)  # evicts LRU
    hit = kv.find_prefix(ids[:24])
    for g, blocks in enumerate(hit.per_group()):
        assert all(b is None or b.key is not None for b in blocks)
        first = kv.first_needed(g, hit.num_tokens)
        assert None not in blocks[first:]


def test_every_request_eventually_finishes():
    kv = KVCacheManager(NUM_BLOCKS, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=6), kv)
    reqs = [
        Request(f"r{i}", None, list(range(i, i + 30)), SamplingParams(max_tokens=20), frozenset())
        for i in range(6)
    ]
    for r in reqs:
        sched.add(r)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert out.scheduled, "no progress"
        for req, n in out.scheduled:  # no drafts: every scheduled token is accepted
            sched.commit(req, req.num_computed_tokens + n)
        for req, _ in out.scheduled:
            if req.num_computed_tokens == req.num_tokens:
                req.append_token(1)
                if req.num_output_tokens >= 20:
                    sched.finish(req, "length")
    assert all(r.finished for r in reqs)
    assert sched.num_preemptions > 0  # 6 x 50 tokens cannot all fit in 96 slots
    assert kv.num_free_blocks == NUM_BLOCKS


def test_double_free_is_caught():
    import pytest

    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([b])


def test_free_queue_is_lru():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for i, x in enumerate((a, b, c)):
        pool.cache(x, bytes([i]), (None, (i,)))
    pool.free([b, a, c])
    assert [x.block_id for x in pool.free_queue] == [b.block_id, a.block_id, c.block_id]
    pool.touch(a)  # a cache hit revives a from the middle of the list
    assert [x.block_id for x in pool.free_queue] == [b.block_id, c.block_id]
    assert isinstance(pool.free_queue, FreeBlockQueue)


def test_uncached_blocks_are_reused_before_cached_ones_are_evicted():
    """A freed block with no hash holds nothing a hit could use: it is handed out first, so a
    cached prefix survives and the pool keeps reusing pages it has already touched."""
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    pool.cache(a, b"a", (None, (1,)))
    pool.free([a])  # cached: the LRU tail
    pool.free([b, c])  # no hash: the front, the last freed first
    assert [x.block_id for x in pool.free_queue] == [c.block_id, b.block_id, a.block_id]
    assert pool.allocate(2) == [c, b]
    assert pool.lookup(b"a") is a  # not evicted
    pool.free([d])
    assert pool.allocate(1) == [d]  # the block just freed comes straight back


def test_a_request_after_another_reuses_its_blocks_without_prefix_caching():
    kv = KVCacheManager(NUM_BLOCKS, BS, enable_prefix_caching=False)
    assert kv.allocate_slots("a", 3 * BS, num_computed=0)
    first = set(kv.block_ids("a"))
    kv.free("a")
    assert kv.allocate_slots("b", 3 * BS, num_computed=0)
    assert set(kv.block_ids("b")) == first


def test_priority_orders_admission():
    kv = KVCacheManager(NUM_BLOCKS, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64), kv)
    low = Request("low", None, [1, 2, 3], SamplingParams(), frozenset(), priority=5)
    high = Request("high", None, [4, 5, 6], SamplingParams(), frozenset(), priority=-1)
    sched.add(low)
    sched.add(high)
    assert [r.request_id for r, _ in sched.schedule().scheduled] == ["high"]


def test_reset_prefix_cache_forgets_hits():
    kv = KVCacheManager(NUM_BLOCKS, BS)
    ids = list(range(13))
    assert kv.allocate_slots("a", len(ids))
    kv.cache_full_blocks("a", ids, len(ids))
    kv.free("a")
    assert kv.find_prefix(ids).num_tokens == 12
    kv.reset_prefix_cache()
    assert kv.find_prefix(ids).num_tokens == 0 and kv.num_free_blocks == NUM_BLOCKS


def _running_pair(policy: str):
    kv = KVCacheManager(NUM_BLOCKS, BS)
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, policy=policy)
    sched = Scheduler(config, kv)
    low = [
        Request(f"low{i}", None, [1, 2, 3, 4 + i], SamplingParams(), frozenset(), priority=5)
        for i in range(2)
    ]
    for r in low:
        sched.add(r)
    out = sched.schedule()
    for r, n in out.scheduled:
        sched.commit(r, r.num_computed_tokens + n)
    return sched, low


def test_a_better_priority_displaces_a_running_one():
    sched, low = _running_pair("priority")
    high = Request("high", None, [9, 9, 9], SamplingParams(), frozenset(), priority=-1)
    sched.add(high)
    out = sched.schedule()
    assert out.scheduled[0][0] is high  # ahead of the running ones, this very step
    assert [r.request_id for r in out.preempted] == ["low1"]  # the worst, latest of equals
    assert [r.request_id for r in sched.running] == ["low0", "high"]
    assert [r.request_id for r in sched.waiting] == ["low1"]


def test_fcfs_ignores_priority_and_ties_keep_arrival_order():
    sched, low = _running_pair("fcfs")
    high = Request("high", None, [9, 9, 9], SamplingParams(), frozenset(), priority=-1)
    sched.add(high)
    out = sched.schedule()
    assert not out.preempted and [r.request_id for r, _ in out.scheduled] == ["low0", "low1"]
    kv = KVCacheManager(NUM_BLOCKS, BS)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64), kv)
    same = [Request(f"r{i}", None, [i + 1], SamplingParams(), frozenset(), priority=3)
            for i in range(3)]  # fmt: skip
    for r in same:
        sched.add(r)
    assert [r.request_id for r in sched.waiting] == ["r0", "r1", "r2"]


def test_an_unknown_policy_is_refused():
    import pytest

    from slimserve.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="scheduling policy") as e:
        SchedulerConfig(policy="lottery")
    assert e.value.param == "scheduling_policy"


@settings(max_examples=40, deadline=None)
@given(
    a=st.floats(0.001, 0.1), b=st.floats(0.0, 0.01), c=st.floats(0.0, 0.01),
    slo=st.floats(1.0, 500.0), decodes=st.integers(1, 6), prompt=st.integers(40, 400),
)  # fmt: skip
def test_the_pacer_never_exceeds_the_budget_nor_starves_a_prompt(a, b, c, slo, decodes, prompt):
    """Whatever the fitted costs and the target: every step stays within the token budget,
    gives the prompt at least MIN_CHUNK rows (or what it has left) while others decode, and
    the prompt finishes."""
    import numpy as np

    from slimserve.engine.scheduler import MIN_CHUNK

    kv = KVCacheManager(400, BS)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, tpot_slo_ms=slo)
    sched = Scheduler(config, kv)
    sched.cost.coef = np.array([a, b, c])
    chats = [Request(f"c{i}", None, [i + 1] * 3, SamplingParams(max_tokens=10_000), frozenset())
             for i in range(decodes)]  # fmt: skip
    for r in chats:
        sched.add(r)
    out = sched.schedule()
    for r, n in out.scheduled:
        sched.commit(r, r.num_computed_tokens + n)
        r.append_token(5)
    long = Request("long", None, list(range(prompt)), SamplingParams(max_tokens=1), frozenset())
    sched.add(long)
    for _ in range(prompt):
        out = sched.schedule()
        assert out.num_tokens <= config.max_num_batched_tokens
        rows = dict((r.request_id, n) for r, n in out.scheduled)
        left = long.num_tokens - long.num_computed_tokens
        assert rows.get("long", 0) >= min(MIN_CHUNK, left)
        for r, n in out.scheduled:
            sched.commit(r, r.num_computed_tokens + n)
            if r is not long:
                r.append_token(5)
        if long.num_computed_tokens == long.num_tokens:
            break
    assert long.num_computed_tokens == long.num_tokens
