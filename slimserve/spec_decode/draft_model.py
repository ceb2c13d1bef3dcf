"""A smaller (or more quantized) model with the same vocabulary drafts for the target.

The draft model shares the target's block tables: its KV lives in tensors of its own, indexed by
the same slots, so the scheduler, the allocator and preemption need to know nothing of it. A
request's draft KV catches up lazily, when it is next drafted for: from the last position whose
tokens the draft saw (its whole prompt the first time; usually the one or two tokens a verify
added since), then one row per draft token, every drafting request batched in each round.

Draft KV written into a block another request shares (a prefix-cache hit) is the same tokens at
the same positions, so the same values; and drafts only ever change speed, never output, since
the target verifies each of them.

Drafts are the draft model's greedy tokens (one-hot: engine/rejection.py keeps the target's
distribution exactly), each with the draft's probability of it as its confidence; a request's
drafting stops at the first token below `min_confidence`.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from slimserve import kernels
from slimserve.core.plan import build_plan
from slimserve.core.request import Request
from slimserve.engine.loading import load_model
from slimserve.engine.model_runner import ModelRunner
from slimserve.errors import ModelLoadError, UnsupportedModel
from slimserve.kv_cache.spec import kv_cache_spec
from slimserve.loader import open_model
from slimserve.spec_decode.index import Match


class _DraftState:
    """What the draft model's KV holds for a request: positions below `computed`, plus the
    drafts it wrote after `tail_start`, valid as far as the request's tokens agree with them."""

    __slots__ = ("computed", "tail_start", "tail", "preemptions")

    def __init__(self, preemptions: int):
        self.computed, self.tail_start, self.tail, self.preemptions = 0, 0, [], preemptions

    def valid(self, tokens: list[int]) -> int:
        n = self.tail_start
        for t in self.tail:
            if n >= len(tokens) or tokens[n] != t:
                break
            n += 1
        return max(self.computed, min(n, len(tokens)))


class _View:
    """A request as one draft round sees it (what build_plan reads)."""

    __slots__ = ("request_id", "all_token_ids", "spec_token_ids", "num_computed_tokens")
    wants_prompt_logprobs = False  # the draft model only draws

    def __init__(self, request_id, tokens: list[int], computed: int):
        self.request_id, self.all_token_ids = request_id, tokens
        self.spec_token_ids, self.num_computed_tokens = [], computed

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class DraftModelProposer:
    name = "draft"

    def __init__(self, config, engine, min_confidence: float = 0.2):
        source = open_model(config.model)
        target = engine.model_config
        if source.config.vocab_size != target.vocab_size or (
            source.tokenizer().vocab_size != engine.tokenizer.vocab_size
        ):
            raise ModelLoadError(
                f"the draft model {source.name} has a vocabulary of {source.config.vocab_size} "
                f"tokens and the target {target.vocab_size}: a draft model needs the target's "
                "tokenizer"
            )
        if source.config.sliding_window or engine.kv_spec.group_specs[0].window:
            # The draft reads the target's first block table with layers all of one kind.
            raise UnsupportedModel(
                "a draft model with sliding-window layers, or for a target whose layers all "
                "attend through a window, is not supported"
            )
        econf = engine.config
        native = econf.kernels == "auto" and kernels.available()
        self.model = load_model(source, None, econf.quant_group_size, False, native)
        # The target's block geometry, the draft's own layers and heads.
        spec = dataclasses.replace(
            kv_cache_spec(source.config, econf.cache), num_blocks=engine.kv_spec.num_blocks
        )
        self.runner = ModelRunner(self.model, source.config, spec, native)
        # Blocks come from the target's scheduler (the one owner); their ids are read from its KV.
        self.scheduler, self.kv, self.block_size = engine.scheduler, engine.kv, spec.block_size
        self.min_confidence = min_confidence
        self.source_name = source.name
        # Time and tokens of the one-row rounds (not the catch-up): a draft token's cost.
        self.seconds, self.tokens = 0.0, 0

    @property
    def seconds_per_token(self) -> float | None:
        return self.seconds / self.tokens if self.tokens else None

    def finished(self, req: Request) -> None:
        pass

    def propose(self, req: Request, max_tokens: int) -> Match:
        return self.propose_batch([(req, max_tokens)])[0]

    @torch.inference_mode()
    def propose_batch(self, items: list[tuple[Request, int]]) -> list[Match]:
        matches = [Match() for _ in items]
        live = []  # (index, request, view, cap)
        for i, (req, cap) in enumerate(items):
            state = req.proposer_state
            if not isinstance(state, _DraftState) or state.preemptions != req.num_preemptions:
                state = req.proposer_state = _DraftState(req.num_preemptions)
            cap = self._room(req, cap)
            if cap < 1:
                continue
            tokens = list(req.all_token_ids)
            view = _View(req.request_id, tokens, state.valid(tokens) if tokens else 0)
            view.num_computed_tokens = min(view.num_computed_tokens, len(tokens) - 1)
            live.append((i, req, view, cap))
        first = True
        while live:
            t0 = time.perf_counter()
            scheduled = [(v, v.num_tokens - v.num_computed_tokens) for _, _, v, _ in live]
            tables = {v.request_id: self.kv.block_ids(v.request_id) for v, _ in scheduled}
            plan = build_plan(scheduled, tables, self.block_size)
            logits = self.runner.execute(plan)
            probs = torch.softmax(logits.float(), dim=-1)
            conf, best = probs.max(dim=-1)
            going = []
            for (i, req, view, cap), p, tok in zip(live, conf.tolist(), best.tolist()):
                view.num_computed_tokens = view.num_tokens
                m = matches[i]
                if p >= self.min_confidence or not m.tokens:
                    m.tokens.append(tok)
                    m.confidence.append(p)
                    view.all_token_ids.append(tok)
                if len(m.tokens) < cap and p >= self.min_confidence:
                    going.append((i, req, view, cap))
                else:
                    self._remember(req, view, len(m.tokens))
            if not first:  # the cost of a draft token: rounds of one row per request
                self.seconds += time.perf_counter() - t0
                self.tokens += len(live)
            first, live = False, going
        for m in matches:
            m.match_len = len(m.tokens)
        return matches

    def _room(self, req: Request, cap: int) -> int:
        """Drafts whose KV rows (all but the last draft's) fit blocks the request holds or can
        get now; the scheduler asks for the same blocks when it runs the verify."""
        rid = req.request_id
        if not self.scheduler.reserve(rid, req.num_tokens + cap - 1):
            held = len(self.kv.block_ids(rid)) * self.block_size
            cap = min(cap, held - req.num_tokens + 1)
        return cap

    @staticmethod
    def _remember(req: Request, view: _View, drafted: int) -> None:
        """The draft KV now covers the request's tokens and all drafts but the last one."""
        state = req.proposer_state
        n = req.num_tokens
        state.computed, state.tail_start = n, n
        state.tail = view.all_token_ids[n : n + drafted - 1]
