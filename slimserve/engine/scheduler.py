"""Continuous batching by token budget.

No prefill or decode phases: every request has `num_computed_tokens` catching up with
`num_tokens` (plus any draft tokens proposed after them), and each step hands out up to
`max_num_batched_tokens` tokens, running requests first (a decode costs 1, a verify of k drafts
k + 1), then waiting ones (a prompt, or a chunk of it). Tokens are credited only after the step,
up to what was accepted (`commit`): a rejected draft is never credited nor cached. When KV blocks
run out, the lowest-priority running request is preempted, one still in its prompt before one
that streams, and of those the one that has computed the least (what it loses is smallest): its
blocks are freed but stay published in the prefix cache (and in the disk tier when there is
one), so it comes back as a prefix hit and only what was lost is recomputed (counted:
`recomputed_tokens`). Its output does not change.

Policies (`SchedulerConfig.policy`): under "priority" (the default) the waiting queue is ordered
by (priority, arrival), and before the running requests take the step's budget, a waiting
request of a better priority than some running one is admitted first, preempting the worst
running ones when seats or KV blocks are short; with equal priorities nothing differs from
first come, first served. Under "fcfs" priorities are ignored.

With a time-per-output-token target (`tpot_slo_ms`), a step that holds decodes takes no more
prompt rows than the step-time model (engine/step_cost.py, fitted on the engine's own steps)
says fit in the target beside them, and never fewer than `MIN_CHUNK`: decodes keep their pace and
long prompts still progress every step.

The scheduler is the one owner of KV blocks: the draft model's look-ahead and prompt scoring
reserve and release them through it (`reserve`, `release`), and the page movements the KV
manager decided (loads from a tier, saves to it) leave with each `SchedulerOutput` (`kv_ops`)
for the runner to carry out.
"""

from __future__ import annotations

import bisect
import time

from slimserve.config import SchedulerConfig
from slimserve.core.plan import SchedulerOutput
from slimserve.core.request import Request, RequestStatus
from slimserve.engine.step_cost import StepModel, keys_read
from slimserve.kv_cache.manager import KVCacheManager
from slimserve.kv_cache.ops import KVOp

MIN_CHUNK = 16  # the fewest prompt rows a step gives a prompt being prefilled, whatever the target


class _Pacer:
    """Under a TPOT target, how many prompt rows this step may still add beside its decodes."""

    def __init__(self, cost: StepModel, target_s: float, decoding: list[Request]):
        self.cost, self.target_s = cost, target_s
        rows = [1 + len(r.spec_token_ids) for r in decoding]
        self.rows = sum(rows)
        self.keys = sum(keys_read(r.num_computed_tokens, n) for r, n in zip(decoding, rows))
        self.granted = 0  # prompt rows given this step

    def cap(self, start: int, n: int) -> int:
        """A prompt chunk of at most `n` rows from position `start`, paced: what fits in the
        target, and for the step's first chunk never fewer than MIN_CHUNK (so some prompt
        always progresses); 0 when a later one does not fit (it waits a step)."""
        allowed = self.cost.chunk(self.target_s, self.rows, self.keys, start, n)
        if not self.granted:
            allowed = max(min(n, MIN_CHUNK), allowed)
        self.rows += allowed
        self.keys += keys_read(start, allowed)
        self.granted += allowed
        return allowed


def _order(req: Request):
    # Lower priority value first, then arrival.
    return (req.priority, req.arrival_time)


def _victim_order(req: Request):
    # The worst priority first; among equals, one still in its prompt (no stream to stall yet),
    # then the one whose preemption loses the least KV.
    return (req.priority, req.num_output_tokens == 0, -req.num_computed_tokens, req.arrival_time)


def _arrival(req: Request):
    return req.arrival_time


def _least_computed(req: Request):
    return (req.num_output_tokens == 0, -req.num_computed_tokens, req.arrival_time)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, session_ttl: float = 0.0):
        self.config = config
        self.kv = kv
        self.session_ttl = session_ttl  # how long a finished session request's blocks are kept
        by_priority = config.policy == "priority"
        self._order = _order if by_priority else _arrival
        self._victim = _victim_order if by_priority else _least_computed
        self.waiting: list[Request] = []  # sorted by self._order
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self.num_swapped = 0  # of those, with a tier holding its published blocks
        self.recomputed_tokens = 0  # tokens run again whose KV a request had computed before
        self.cost = StepModel()  # step time, fitted on the engine's steps (Engine.step)

    def add(self, req: Request) -> None:
        bisect.insort(self.waiting, req, key=self._order)
        self.kv.prefetch(req.all_token_ids)  # a tier reads its prefix ahead while it waits

    def take_kv_ops(self) -> list[KVOp]:
        """Page movements decided since the last step (the saves of blocks it filled)."""
        return self.kv.take_ops()

    def kv_saved(self, op: KVOp, payload: bytes) -> None:
        self.kv.saved(op, payload)

    def reserve(self, request_id, num_tokens: int) -> bool:
        """Hold blocks for `num_tokens` tokens of `request_id` outside a step: a running
        request's draft look-ahead, or a scoring pass (any id no client request uses)."""
        return self.kv.allocate_slots(request_id, num_tokens)

    def release(self, request_id) -> None:
        """Give back what `reserve` held for an id that is not a scheduled request."""
        self.kv.free(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        if self.kv.sessions:
            self.kv.expire_sessions(time.monotonic())
        suspect = next((r for r in self.running if r.suspect), None)
        if suspect is None:
            suspect = next((r for r in self.waiting if r.suspect), None)
        if suspect is not None:
            out = self._alone(suspect)
            if out.scheduled:
                return self._seal(out)
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        pacer = self._pacer()
        ahead = self._displace(out, budget, pacer) if self._order is _order else None
        if ahead is not None:
            budget -= out.scheduled[0][1]
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._rows(req, budget)
            chunk = n > 1 and not req.spec_token_ids
            if ahead is not None and (req is ahead or chunk and req.priority > ahead.priority):
                # Admitted ahead this step (_displace); or a worse prompt chunk, which waits a
                # step so that the better request's first token comes in a short one.
                i += 1
                continue
            if pacer is not None and chunk:
                n = pacer.cap(req.num_computed_tokens, n)
                if not n:  # no room in the target this step: it waits for the next
                    i += 1
                    continue
            while not self.kv.allocate_slots(
                req.request_id, req.num_computed_tokens + n, num_computed=req.num_computed_tokens
            ):
                victim = max((r for r in self.running[i:] if r is not ahead), key=self._victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, n))
                budget -= n
                i += 1
        # New work only when nothing had to give way this step.
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
            and (ahead is None or self.waiting[0].priority <= ahead.priority)
        ):
            n = self._admit(self.waiting[0], budget, pacer)
            if not n:
                break
            out.scheduled.append((self.running[-1], n))
            budget -= n
        return self._seal(out)

    def _seal(self, out: SchedulerOutput) -> SchedulerOutput:
        """The step's page movements join it; rows that compute KV again are counted."""
        out.kv_ops = self.kv.take_ops()
        for req, n in out.scheduled:
            self.recomputed_tokens += max(
                0, min(req.num_computed_tokens + n, req.computed_high) - req.num_computed_tokens
            )
        return out

    def _pacer(self) -> _Pacer | None:
        """The step's pacing under a TPOT target, when some running request decodes."""
        slo = self.config.tpot_slo_ms
        if slo is None:
            return None
        decoding = [r for r in self.running if r.num_computed_tokens >= r.num_tokens - 1]
        return _Pacer(self.cost, slo / 1000, decoding) if decoding else None

    def _displace(self, out: SchedulerOutput, budget: int, pacer=None) -> Request | None:
        """Admit the best waiting request ahead of the running ones when its priority beats
        the worst of theirs, preempting those worse than it while seats or KV blocks are short
        for its first chunk; returns it when admitted."""
        if not self.waiting or not self.running:
            return None
        req = self.waiting[0]
        worse = [r for r in self.running if r.priority > req.priority]
        if not worse:
            return None
        need = self.kv.blocks_needed(min(req.num_tokens, budget)) * len(self.kv.groups)
        while worse and (
            len(self.running) >= self.config.max_num_seqs or self.kv.num_free_blocks < need
        ):
            victim = max(worse, key=_victim_order)
            worse.remove(victim)
            self._preempt(victim)
            out.preempted.append(victim)
        if len(self.running) >= self.config.max_num_seqs:
            return None
        n = self._admit(req, budget, pacer)
        if not n:
            return None
        out.scheduled.append((req, n))
        return req

    @staticmethod
    def _rows(req: Request, budget: int) -> int:
        """A running request's new rows this step: what it has not computed, drafts included."""
        return min(req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens, budget)

    def _admit(self, req: Request, budget: int, pacer: _Pacer | None = None) -> int:
        """Move waiting `req` to running with its prefix-cache hit and KV for up to `budget` new
        rows; returns the rows, or 0 (left waiting) when the KV does not fit."""
        # Only blocks whose positions already have their logprobs (after a preemption) for a
        # request that scores its prompt: the rest must run to produce them.
        keep = None
        if req.wants_prompt_logprobs:
            keep = max(0, len(req.prompt_logprobs) - 1) // self.kv.block_size
        hit = self.kv.find_prefix(req.all_token_ids, keep)  # num_computed_tokens is 0 here
        n = min(req.num_tokens - hit.num_tokens, budget)
        if pacer is not None and n > 1:
            n = pacer.cap(hit.num_tokens, n)
            if not n:
                return 0
        if not self.kv.allocate_slots(req.request_id, hit.num_tokens + n, hit):
            return 0
        self.kv.record_lookup(req.num_tokens, hit)
        req.num_computed_tokens = hit.num_tokens
        if req.num_cached_tokens is None:  # the first admission's hit (not a preemption's)
            req.queued_s = time.monotonic() - req.arrival_time
            req.num_cached_tokens = hit.num_tokens
            req.num_tier_tokens = hit.stored_tokens
            if req.params.session_id is not None:
                req.session_diverged_at = self.kv.sessions.diverged_at(
                    req.params.session_id, req.prompt_token_ids
                )
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return n

    def _alone(self, req: Request) -> SchedulerOutput:
        """A step of `req` alone (a suspect: Engine._contain); empty when its KV does not fit
        now (it then runs with the others)."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if req.status is RequestStatus.RUNNING:
            n = self._rows(req, budget)
            if self.kv.allocate_slots(
                req.request_id, req.num_computed_tokens + n, num_computed=req.num_computed_tokens
            ):
                out.scheduled.append((req, n))
        elif n := self._admit(req, budget):
            out.scheduled.append((req, n))
        return out

    def requeue(self, req: Request) -> None:
        """A running request back to waiting with its KV dropped (recomputed when it runs
        again): a step that raised left its KV unknown."""
        self._preempt(req, keep_partial=False)  # what the failed step wrote is unknown
        self.num_preemptions -= 1  # not for want of memory
        self.num_swapped -= self.kv.tier is not None

    def commit(self, req: Request, num_computed: int) -> None:
        """Credit `req` with KV for its first `num_computed` tokens (those accepted: every token
        is in `all_token_ids` by now) and publish its newly full blocks to the prefix cache."""
        req.num_computed_tokens = num_computed
        req.computed_high = max(req.computed_high, num_computed)
        self.kv.cache_full_blocks(req.request_id, req.all_token_ids, num_computed)

    def _preempt(self, req: Request, keep_partial: bool = True) -> None:
        self.running.remove(req)
        if keep_partial:  # its partial last block comes back with it, like its full ones
            self.kv.keep_partial(req.request_id, req.all_token_ids, req.num_computed_tokens)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.num_swapped += self.kv.tier is not None
        self.add(req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        sid = req.params.session_id
        if sid is not None and self.session_ttl > 0 and reason != "error":
            # Its blocks wait for the session's next turn (released first under pressure).
            expires = time.monotonic() + self.session_ttl
            self.kv.pin(sid, req.request_id, req.all_token_ids, expires)
        self.kv.free(req.request_id)
