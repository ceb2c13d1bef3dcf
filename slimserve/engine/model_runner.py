"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

The only place that builds tensors for a step. Tokens of all requests are flattened into one
(T,) batch: decodes (one new token each) first, so they share one batched attention call, then
each prompt chunk. Linear layers see no padding; only attention views the batch per sequence.
"""

from __future__ import annotations

import torch

from slimserve import kernels
from slimserve.config import CacheConfig, ModelConfig
from slimserve.engine.decode_step import NativeDecodeStep
from slimserve.engine.forward_context import AttentionGroup, ForwardContext, forward_context
from slimserve.engine.request import Request
from slimserve.engine.sampler import Sampler, SamplerOutput
from slimserve.errors import CapacityError
from slimserve.kv_cache.manager import KVCacheManager
from slimserve.layers.attention import Attention
from slimserve.sampling_params import SamplingParams

# Cascade decode attention pays off once the shared prefix spans a few blocks.
CASCADE_MIN_BLOCKS = 4


def _common_prefix(tables: list[list[int]]) -> int:
    """How many leading block ids every table has in common (shared through the prefix cache)."""
    n = min(len(t) for t in tables)
    first = tables[0]
    for i in range(n):
        b = first[i]
        if any(t[i] != b for t in tables):
            return i
    return n


def kv_row(cfg: ModelConfig, dtype: str = "float32") -> tuple[int, torch.dtype]:
    """Elements and dtype of one head's key (or value) for one token in the cache: an int8 row
    carries its float32 scale in 4 extra bytes (layers/attention.py)."""
    if dtype == "int8":
        return cfg.head_dim + 4, torch.int8
    return cfg.head_dim, torch.bfloat16 if dtype == "bfloat16" else torch.float32


def kv_bytes_per_token(cfg: ModelConfig, dtype: str = "float32") -> int:
    width, torch_dtype = kv_row(cfg, dtype)
    return cfg.num_layers * 2 * cfg.num_kv_heads * width * torch_dtype.itemsize


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, model_config: ModelConfig, cache_config: CacheConfig
    ):
        self.model = model
        self.config = model_config
        self.block_size = cache_config.block_size
        self.kv_dtype = cache_config.dtype
        per_block = kv_bytes_per_token(model_config, self.kv_dtype) * self.block_size
        self.num_blocks = max(1, cache_config.memory_bytes // per_block)
        self.kv = KVCacheManager(
            self.num_blocks, self.block_size, cache_config.enable_prefix_caching, salt=model_config
        )
        # Zeroed, not empty: padded attention slots must hold finite numbers (0 * NaN is NaN).
        slots = self.num_blocks * self.block_size
        # Head-major (Hkv, slots, D) per layer and K/V: see layers/attention.py.
        width, dtype = kv_row(model_config, self.kv_dtype)
        self.kv_cache = torch.zeros(
            model_config.num_layers, 2, model_config.num_kv_heads, slots, width, dtype=dtype
        )
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        for i, attn in enumerate(layers):
            attn.kv_cache = (self.kv_cache[i, 0], self.kv_cache[i, 1])
        self.sampler = Sampler()
        group = model_config.num_heads // model_config.num_kv_heads
        self.native_decode_shape = kernels.decode_attention_supports(group, model_config.head_dim)
        self.native_step = NativeDecodeStep.build(
            model, model_config, self.kv_cache, self.block_size
        )

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @torch.inference_mode()
    def execute(
        self, scheduled: list[tuple[Request, int]]
    ) -> tuple[list[Request], SamplerOutput | None]:
        """Run one step; returns the requests that sample a token now and their samples."""
        ctx, input_ids, positions, sample_reqs = self._prepare(scheduled)
        with forward_context(ctx):
            if self.native_step is not None and self.native_step.takes(ctx):
                hidden = self.native_step(input_ids, positions, ctx)
            else:
                hidden = self.model(input_ids, positions)
            if not sample_reqs:
                return [], None
            logits = self.model.compute_logits(hidden)
        return sample_reqs, self.sampler(logits, sample_reqs)

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """(T, V) logits at every position of one sequence, for evaluation and reference tests.

        With `chunk`, the sequence runs as chunked prefill: each chunk attends to the earlier
        ones through the KV cache, so the cache's storage (e.g. int8) shows in the logits.
        Uses free KV blocks for the duration of the call and gives them back."""
        n = len(token_ids)
        req = Request("__prompt_logits__", None, list(token_ids), SamplingParams(), frozenset())
        if not self.kv.allocate_slots(req.request_id, n):
            raise CapacityError(f"{n} tokens do not fit the free KV cache")
        out = []
        try:
            for start in range(0, n, chunk or n):
                req.num_computed_tokens = start
                size = min(chunk or n, n - start)
                ctx, input_ids, positions, _ = self._prepare([(req, size)])
                ctx.logits_indices = torch.arange(size)
                with forward_context(ctx):
                    out.append(self.model.compute_logits(self.model(input_ids, positions)))
            return torch.cat(out)
        finally:
            self.kv.free(req.request_id)

    def _prepare(self, scheduled):
        bs = self.block_size
        ids, pos, slots, groups, logits_rows, sample_reqs = [], [], [], [], [], []
        # Decodes first, as one attention group per run of sequences sharing a prefix (cascade)
        # and one for the rest; then each prompt chunk.
        tables = {r.request_id: self.kv.block_ids(r.request_id) for r, _ in scheduled}
        order = []
        for run, common in self._plan_decodes([r for r, n in scheduled if n == 1], tables):
            groups.append(self._decode_group(run, len(order), common, tables))
            order += [(r, 1) for r in run]
        order += [(r, n) for r, n in scheduled if n != 1]
        for r, n in order:
            start = r.num_computed_tokens
            table = tables[r.request_id]
            first = len(ids)
            ids += r.all_token_ids[start : start + n]
            pos += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n > 1:
                groups.append(self._prefill_group(first, start, n, table))
            if start + n == r.num_tokens:
                logits_rows.append(len(ids) - 1)
                sample_reqs.append(r)
        ctx = ForwardContext(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            groups=groups,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long),
        )
        return (
            ctx,
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(pos, dtype=torch.long),
            sample_reqs,
        )

    def _blocks(self, tables: list[list[int]], length: int) -> torch.Tensor | slice:
        """(B, nblk) block ids covering positions 0..length-1 of each table (padded with 0).

        One table of consecutive blocks gives a slice of slots instead: attention then reads a
        view of the cache rather than gathering a copy (the common case for a lone request)."""
        nblk = -(-length // self.block_size)
        head = tables[0][:nblk]
        if len(tables) == 1 and head == list(range(head[0], head[0] + nblk)):
            return slice(head[0] * self.block_size, head[0] * self.block_size + length)
        rows = [t[:nblk] + [0] * (nblk - len(t[:nblk])) for t in tables]
        return torch.tensor(rows, dtype=torch.long)

    def _plan_decodes(
        self, reqs: list[Request], tables: dict[str, list[int]]
    ) -> list[tuple[list[Request], int]]:
        """Runs of decoding requests, each with the number of leading blocks all of them share
        (0 for the last run, which holds every request that shares too little)."""
        by_first: dict[int, list[Request]] = {}
        for r in reqs:
            by_first.setdefault(tables[r.request_id][0], []).append(r)
        runs, rest = [], []
        for run in by_first.values():
            newest = min(r.num_computed_tokens for r in run)  # shared blocks end before it
            common = min(
                _common_prefix([tables[r.request_id] for r in run]), newest // self.block_size
            )
            if len(run) > 1 and common >= CASCADE_MIN_BLOCKS:
                runs.append((run, common))
            else:
                rest += run
        return runs + ([(rest, 0)] if rest else [])

    def _decode_group(
        self, reqs: list[Request], start: int, common: int, tables: dict[str, list[int]]
    ) -> AttentionGroup:
        """One-token queries of `reqs`; with `common` shared leading blocks, a cascade group
        (prefix attended once, then each suffix), else plain batched attention."""
        rows = [tables[r.request_id] for r in reqs]
        shared_len = common * self.block_size  # < every length: the newest token's block is private
        lens = [r.num_computed_tokens + 1 - shared_len for r in reqs]
        L = max(lens)
        shared = self._blocks([rows[0][:common]], shared_len) if common else None
        mask = seq_lens = None
        if self.native_decode_shape and kernels.available("paged_decode_attention"):
            # The native kernel reads each sequence's own blocks in place: no mask, no gather.
            nblk = -(-L // self.block_size)
            table = [t[common : common + nblk] for t in rows]
            blocks = torch.tensor([t + [0] * (nblk - len(t)) for t in table], dtype=torch.long)
            seq_lens = torch.tensor(lens, dtype=torch.long)
        else:
            if min(lens) != L:
                visible = (torch.arange(L).unsqueeze(0) < torch.tensor(lens).unsqueeze(1))[
                    :, None, None
                ]
                # The cascade path calls the LSE-returning kernel, which takes an additive mask.
                mask = (
                    torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
                    if common
                    else visible
                )
            blocks = self._blocks([t[common:] for t in rows], L)
        return AttentionGroup(
            start,
            start + len(reqs),
            len(reqs),
            1,
            blocks,
            mask,
            causal=False,
            kv_len=L,
            block_size=self.block_size,
            shared=shared,
            shared_len=shared_len,
            seq_lens=seq_lens,
        )

    def _prefill_group(self, first: int, start: int, n: int, table: list[int]) -> AttentionGroup:
        if start == 0:  # a fresh prompt attends to its own new keys, plain causal
            return AttentionGroup(first, first + n, 1, n, None, None, causal=True)
        L = start + n
        q_pos = torch.arange(start, L).unsqueeze(1)
        mask = (torch.arange(L).unsqueeze(0) <= q_pos)[None, None]  # (1, 1, n, L)
        blocks = self._blocks([table], L)
        return AttentionGroup(
            first, first + n, 1, n, blocks, mask, causal=False, kv_len=L, block_size=self.block_size
        )
