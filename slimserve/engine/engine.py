"""The engine loop: add requests, step, stream outputs. The CLI, LLM and server drive this.

The engine builds the pieces and owns the decisions between them: the KV cache spec and manager
(handed to the scheduler; the runner only allocates tensors), the step plan from the scheduler's
choice, sampling and verification of the runner's logits, and crediting what was accepted.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING

import torch

from slimserve import kernels
from slimserve.config import EngineConfig, num_threads_from_env
from slimserve.core.plan import StepPlan, build_plan
from slimserve.core.request import Request
from slimserve.engine import memory, rejection, scoring
from slimserve.engine.drafting import propose_drafts
from slimserve.engine.intake import Intake
from slimserve.engine.loading import load_model
from slimserve.engine.model_runner import ModelRunner
from slimserve.engine.output_processor import append_tokens, to_output
from slimserve.engine.sampler import Sampler, SamplingRow
from slimserve.engine.scheduler import Scheduler
from slimserve.engine.stats import EngineStats
from slimserve.engine.step_cost import keys_read
from slimserve.errors import CapacityError, EngineDead, InvalidRequest
from slimserve.kv_cache.hashing import kv_salt
from slimserve.kv_cache.manager import KVCacheManager
from slimserve.kv_cache.spec import kv_cache_spec
from slimserve.kv_cache.tiers import DiskTier
from slimserve.loader import open_model
from slimserve.outputs import RequestOutput
from slimserve.sampling_params import SamplingParams

if TYPE_CHECKING:  # speculative decoding is a plug-in above the engine (spec_decode/)
    from slimserve.spec_decode import Speculator

logger = logging.getLogger("slimserve")


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        progress: bool = False,
    ):
        config = config or EngineConfig()
        threads = config.num_threads or num_threads_from_env()
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.config = config
        self.source = open_model(config.model)
        self.model_config = self.source.config
        self.tokenizer = self.source.tokenizer()
        native = config.kernels == "auto" and kernels.available()
        self.model = load_model(
            self.source, config.quantization, config.quant_group_size, progress, native,
            config.expert_cache_memory, config.expert_prefetch,
        )  # fmt: skip
        cache = memory.fit_cache(config.cache, config.memory_budget, self.model, self.model_config)
        self.kv_spec = kv_cache_spec(self.model_config, cache)
        salt = kv_salt(
            self.source.identity(), cache.dtype, cache.block_size, self.model.quantization,
            config.quant_group_size,
        )  # fmt: skip
        tier = None
        if cache.disk_dir and cache.enable_prefix_caching:
            tier = DiskTier.open(cache.disk_dir, cache.disk_bytes, self.kv_spec.page_bytes)
            if tier is not None:
                atexit.register(tier.close)  # queued pages are written on a clean exit
        self.kv = KVCacheManager(
            self.kv_spec.num_blocks, cache.block_size, cache.enable_prefix_caching, salt,
            self.kv_spec.group_specs, tier,
        )  # fmt: skip
        self.runner = ModelRunner(self.model, self.model_config, self.kv_spec, native)
        if tier is not None:
            self._populate_ahead()
        self.scheduler = Scheduler(config.scheduler, self.kv, cache.session_ttl)
        self.sampler = Sampler(native_argmax=native and kernels.available("argmax"))
        budget = config.scheduler.max_num_batched_tokens
        # Speculative decoding plugs in after build (spec_decode.attach, or build_engine below):
        # a draft model shares the finished engine's block tables.
        self.speculator: Speculator | None = None
        self.max_model_len = min(
            config.scheduler.max_model_len or self.model_config.max_position,
            self.model_config.max_position,
        )
        self.requests: dict[str, Request] = {}
        self.intake = Intake(
            self.tokenizer, self.model_config.vocab_size, self.max_model_len, self.kv_spec, budget
        )
        # Tokens a grammar forces are drafted and verified in one step (False: one at a time,
        # for A/B runs).
        self.jump_forward = True
        self._ids = itertools.count()
        self._steps, self._last_batch = 0, (0, 0)
        self._computed_tokens = self._prompt_tokens_computed = 0
        self.load_seconds = time.perf_counter() - t0
        logger.info("%s", memory.load_summary(self))

    def memory(self) -> dict[str, int]:
        """Bytes of the packed weights, the KV cache as reserved, the expert cache, the disk
        tier's buffers at most, kept sessions' pages, and the process's resident set (the KV
        cache's pages become resident as blocks are first written)."""
        return {
            "weights": memory.weight_bytes(self.model),
            "kv_cache": self.runner.kv_cache.nbytes,
            "expert_cache": memory.expert_cache_bytes(self.model),
            "kv_disk_buffers": memory.tier_buffer_bytes(self.config.cache),
            # Of kv_cache, what kept sessions hold (block references).
            "sessions_pinned": self.kv.num_pinned * self.kv_spec.page_bytes,
            "resident": memory.resident_bytes(),
        }

    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def capacity_tokens(self) -> int:
        return self.kv_spec.capacity_tokens

    def use_kernels(self, native: bool) -> None:
        """Rebuild the step on the native kernels (those `kernels.set_enabled` leaves on) or on
        the PyTorch paths: for A/B tests and benchmarks. Weight layouts stay as loaded."""
        self.runner.select_kernels(native and kernels.available())
        self.sampler.native_argmax = native and kernels.available("argmax")

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a prompt (text, or token ids) and return its request id."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.enqueue(self.make_request(prompt, params, request_id, priority))
        return request_id

    def make_request(
        self, prompt: str | list[int], params: SamplingParams | None, request_id: str,
        priority: int = 0,
    ) -> Request:  # fmt: skip
        """Tokenize and validate a request without touching engine state (it reads only what
        never changes after build), so any thread may call it while a step runs."""
        return self.intake.make(prompt, params, request_id, priority)

    def enqueue(self, req: Request) -> None:
        """Hand a request from `make_request` to the scheduler (the engine's thread only)."""
        if req.request_id in self.requests:
            raise InvalidRequest(f"request id {req.request_id!r} is already in use")
        self.check_session(req.params.session_id)
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def check_session(self, session_id: str | None) -> None:
        """Refuse a new session past `max_sessions` (one kept, or running, counts). Reads only
        a dict's size and keys: any thread may call it."""
        cache = self.config.cache
        if session_id is None or not cache.session_ttl or session_id in self.kv.sessions:
            return
        if len(self.kv.sessions) >= cache.max_sessions:
            raise InvalidRequest(
                f"session_id {session_id!r} would be session {cache.max_sessions + 1}: at most "
                f"{cache.max_sessions} are kept at once (--max-sessions); reuse one or retry "
                "after one expires", param="session_id",
            )  # fmt: skip

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is (waiting, mid-prefill, decoding) and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _populate_ahead(self, tokens: int = 2048) -> None:
        """With a disk tier: fault in the KV pages of the blocks the pool hands out first
        (`tokens` worth, ~47 MB for the default model), on a thread of its own, so that a
        prefix loaded from disk after a restart writes into resident memory (its page faults
        were a third of a restart hit's time)."""
        from slimserve.engine.model_runner import populate_blocks

        bs = self.kv_spec.block_size
        blocks = range(1, 1 + min(self.kv_spec.num_blocks, -(-tokens // bs)))
        threading.Thread(
            target=populate_blocks, args=(self.runner.kv_cache, blocks, bs),
            name="kv-populate", daemon=True,
        ).start()  # fmt: skip

    def idle(self) -> bool:
        """Housekeeping between steps when nothing runs: expire kept sessions (a step does it
        otherwise). True when something changed."""
        if not self.kv.sessions:
            return False
        n = len(self.kv.sessions)
        self.kv.expire_sessions(time.monotonic())
        return len(self.kv.sessions) != n

    def warm_up(self) -> None:
        """Run one short request through a prompt step and decode steps, then forget it: the
        first steps on a thread pay for its OpenMP team, first-touched pages and lazy setup
        (a server's first chat took ~20 ms more than the next). Leaves no block published
        (fewer tokens than a block), nothing in the counters, and no request behind."""
        counters = (self._steps, self._last_batch, self._computed_tokens,
                    self._prompt_tokens_computed, self.kv.stats.queries,
                    self.kv.stats.hits)  # fmt: skip
        n = min(self.kv_spec.block_size - 4, 8)
        if n < 2 or self.has_unfinished():
            return
        rid = self.add_request(list(range(1, n + 1)), SamplingParams(max_tokens=3, ignore_eos=True))
        try:
            while rid in self.requests:
                self.step()
        finally:
            self.abort(rid)
            (self._steps, self._last_batch, self._computed_tokens, self._prompt_tokens_computed,
             self.kv.stats.queries, self.kv.stats.hits) = counters  # fmt: skip

    def close(self) -> None:
        """Carry out the page movements still queued and let the disk tier write them."""
        self._move_kv(self.scheduler.take_kv_ops())
        self.kv.close()

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=kv.num_blocks,
            kv_blocks_free=kv.num_free_blocks,
            prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits,
            preemptions=self.scheduler.num_preemptions,
            preemptions_swap=self.scheduler.num_swapped,
            recomputed_tokens=self.scheduler.recomputed_tokens,
            steps=self._steps,
            last_batch_size=self._last_batch[0],
            last_batch_tokens=self._last_batch[1],
            tokens_computed=self._computed_tokens,
            prompt_tokens_computed=self._prompt_tokens_computed,
            **self._spec_stats(),
            sessions=len(kv.sessions),
            session_pinned_blocks=kv.num_pinned,
            sessions_expired=kv.sessions.expired,
            sessions_pressed=kv.sessions.pressed,
            kv_ram_bytes=kv.num_resident * self.kv_spec.page_bytes,
            **self._tier_stats(),
        )

    def _tier_stats(self) -> dict:
        kv, tier = self.kv, self.kv.tier
        if tier is None:
            return {}
        return dict(tier_hits=kv.stats.tier_hits, tier_loads=kv.stats.loads,
                    tier_saves=tier.stats.saves, tier_corrupt=tier.stats.corrupt,
                    tier_bytes=tier.stats.bytes)  # fmt: skip

    def _spec_stats(self) -> dict:
        spec = self.speculator
        if spec is None:
            return {}
        return dict(spec_draft_tokens=spec.num_drafts, spec_accepted_tokens=spec.num_accepted,
                    spec_verifies=spec.num_verifies)  # fmt: skip

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that advanced or finished."""
        out = self.scheduler.schedule()
        self._last_batch = (len(out.scheduled), out.num_tokens)
        try:
            self._move_kv(out.kv_ops)
        except Exception as e:  # pages that never arrived: recomputed, never served
            self.kv.load_failed(out.kv_ops)
            if not out.scheduled:
                raise
            return self._contain([r for r, _ in out.scheduled], e)
        if not out.scheduled:
            return []
        self._steps += 1
        self._computed_tokens += out.num_tokens
        self._prompt_tokens_computed += sum(
            max(0, min(n, r.num_prompt_tokens - r.num_computed_tokens)) for r, n in out.scheduled
        )
        tables = {r.request_id: self.kv.tables(r.request_id) for r, _ in out.scheduled}
        try:
            t0 = time.perf_counter()
            plan = build_plan(out.scheduled, tables, self.kv_spec.block_size)
            rows = self._sampling_rows(plan)
            self.sampler.prepare(rows)
            logits, scores = self.runner.execute(plan), None
            if logits is not None:
                logits, scores = plan.split_logits(logits)
            samples = self.sampler(logits, rows) if rows else None
            seconds = time.perf_counter() - t0
            if self.config.scheduler.tpot_slo_ms is not None:  # only pacing reads the model
                keys = sum(keys_read(sp.start, sp.num_rows) for sp in plan.spans)
                self.scheduler.cost.observe(plan.num_rows, keys, seconds)
        except Exception as e:
            return self._contain([r for r, _ in out.scheduled], e)
        outputs = self._postprocess(plan, samples, scores)
        self._move_kv(self.scheduler.take_kv_ops())  # the pages of the blocks it filled
        if self.speculator is not None and plan.decode_only:
            # The steps drafts add rows to (prompt rows cost otherwise).
            self.speculator.observe_step(plan.num_rows, seconds)
        propose_drafts(
            self.scheduler.running, self.speculator, self.jump_forward, self.max_model_len,
            self.model_config.vocab_size,
        )  # fmt: skip
        return outputs

    def _move_kv(self, ops) -> None:
        if ops:
            self.runner.execute_kv_ops(ops, self.scheduler.kv_saved)

    # -- faults -----------------------------------------------------------------------------
    def _contain(self, reqs: list[Request], error: Exception) -> list[RequestOutput]:
        """A step raised. Alone, its request fails with the error; with others, every one of them
        goes back to wait (its KV recomputed) and runs alone until it draws a token, so only the
        request that causes the fault fails. If a one-token canary fails too, the engine itself
        is broken: EngineDead, for the caller to stop on."""
        if len(reqs) > 1:
            logger.warning("a step of %d requests failed (%r); isolating them", len(reqs), error)
            for req in reqs:
                self.scheduler.requeue(req)
                req.suspect = True
            return []
        logger.warning("request %s failed: %r", reqs[0].request_id, error)
        out = self._fail(reqs[0], error)
        try:
            self.prompt_logits([0])
        except CapacityError:
            pass  # no free block to try with: not a sign of a broken engine
        except Exception as canary:
            raise EngineDead(f"the engine cannot run a step: {canary!r}") from canary
        return [out]

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        req.error = f"internal error while serving the request: {error!r}"
        req.spec_token_ids = []
        self.scheduler.finish(req, "error")
        self.requests.pop(req.request_id, None)
        return to_output(req)

    @staticmethod
    def _sampling_rows(plan: StepPlan) -> list[SamplingRow]:
        """One row per logits row: the position it draws and the tokens before it."""
        rows = []
        for s in plan.spans:
            if not s.num_samples:
                continue
            r = s.req
            tokens = r.all_token_ids + r.spec_token_ids if s.num_drafts else r.all_token_ids
            for j in range(s.logits_from + s.prompt_rows, s.num_rows):
                rows.append(SamplingRow(r.params, r.seed, s.start + j + 1, r.prompt_token_ids,
                                        tokens, r.grammar))  # fmt: skip
        return rows

    def _postprocess(self, plan: StepPlan, samples, scores) -> list[RequestOutput]:
        """Score prompts, verify drafts, append what was accepted, credit it, check stops:
        request by request, so a fault here (a tokenizer that raises, say) fails only its own
        request."""
        outputs, i, k = [], 0, 0
        for s in plan.spans:
            req = s.req
            if s.prompt_rows:
                scoring.score_prompt(req, s.start, scores[k : k + s.prompt_rows])
                k += s.prompt_rows
            n = s.num_samples
            if not n:  # a prompt chunk: every row's KV is final
                self.scheduler.commit(req, s.start + s.num_rows)
                continue
            sampled = samples.token_ids[i : i + n]
            logprobs = samples.logprobs[i : i + n]
            i += n
            try:
                outputs.append(self._advance(req, s, sampled, logprobs))
            except Exception as e:
                logger.warning("request %s failed: %r", req.request_id, e)
                outputs.append(self._fail(req, e))
        return outputs

    def _advance(self, req: Request, s, sampled: list[int], logprobs) -> RequestOutput:
        tokens = rejection.verify(sampled, req.spec_token_ids[: s.num_drafts])
        req.spec_token_ids = []
        if s.num_drafts and not req.drafts_forced:
            self.speculator.observe(req, s.num_drafts, len(tokens) - 1)
        req.drafts_forced = False
        reason = append_tokens(req, tokens, logprobs, self.max_model_len)
        # KV is valid up to the last accepted draft: rejected rows are neither credited nor
        # published to the prefix cache.
        computed = s.start + s.num_rows - (s.num_drafts - (len(tokens) - 1))
        self.scheduler.commit(req, min(computed, req.num_tokens))
        req.suspect = False  # it ran a whole step: not the cause of an earlier fault
        if reason:
            self.scheduler.finish(req, reason)
            if self.speculator is not None:
                self.speculator.finished(req)
        out = to_output(req)
        if req.finished:
            del self.requests[req.request_id]
        return out

    def prompt_logits(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """(T, V) logits at every position of one sequence (engine/scoring.py)."""
        self._move_kv(self.scheduler.take_kv_ops())
        rid = ("prompt_logits", next(self._ids))  # a tuple: no client request shares its blocks
        return scoring.prompt_logits(
            self.scheduler, self.runner, self.kv_spec.block_size, rid, token_ids, chunk
        )
