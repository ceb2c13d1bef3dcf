"""Allocates the KV cache tensors, binds them and the attention backend to the model's layers,
and runs a step plan: the only place that runs the model.

The runner knows neither requests' bookkeeping nor kernels: the engine hands it a plan
(core/plan.py) and gets back the logits of the rows that need them; the backend chosen
at build (slimserve/backends) decides how attention computes.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch

from slimserve import kernels
from slimserve.backends import make_backend
from slimserve.config import ModelConfig
from slimserve.core.forward_context import ForwardContext, forward_context
from slimserve.core.plan import StepPlan
from slimserve.kv_cache.block_pool import NULL_BLOCK
from slimserve.kv_cache.ops import KVOp
from slimserve.kv_cache.spec import KVCacheSpec
from slimserve.layers.attention import Attention


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeroed memory that costs nothing until written. Zeroed, not empty: padded attention slots
    must hold finite numbers (0 * NaN is NaN). An anonymous mapping is zero pages the OS hands
    out 4 KiB at a time as they are first written, so the cache is reserved as configured but
    only the blocks in use are resident. (torch.zeros writes every byte, 1.8 s for 1 GiB here;
    numpy's zeros is lazy too but asks for 2 MiB huge pages, and a block touches one page in
    each of the cache's layer x K/V x head planes: 360 MiB resident after one short request.)"""
    n = math.prod(shape) * dtype.itemsize
    mapping = mmap.mmap(-1, max(n, 1))
    buf = np.frombuffer(mapping, dtype=np.uint8)[:n]
    out = torch.from_numpy(buf).view(dtype).view(shape)
    out.mapping = mapping  # for populate_blocks
    return out


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in now, their contents untouched


def populate_blocks(cache: torch.Tensor, blocks: range, block_size: int) -> None:
    """Fault in the pages of `blocks` in every plane of a lazily mapped cache now, without
    changing what they hold (safe while a step runs). A first write into a never-touched page
    costs a fault: ~10 ms for the 77 pages a 1,232-token prefix loads from disk. Nothing where
    the OS cannot (another platform, an older kernel)."""
    mapping = getattr(cache, "mapping", None)
    if mapping is None or not len(blocks):
        return
    row = cache.shape[-1] * cache.element_size()
    plane = cache.shape[-2] * row
    first, length = blocks.start * block_size * row, len(blocks) * block_size * row
    page = mmap.PAGESIZE
    try:
        for p in range(math.prod(cache.shape[:-2])):
            start = (p * plane + first) // page * page
            end = min(-(-(p * plane + first + length) // page) * page, len(mapping))
            mapping.madvise(MADV_POPULATE_WRITE, start, end - start)
    except (OSError, AttributeError, ValueError):
        return


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, model_config: ModelConfig, spec: KVCacheSpec, native: bool
    ):
        self.model = model
        self.config = model_config
        self.spec = spec
        self.group_specs = spec.group_specs
        # The backend decides the layout (backends/base.py). Block 0 is the null block, so the
        # cache holds one block more than the pool hands out.
        self.backend = make_backend(model_config, native)
        slots = (NULL_BLOCK + 1 + spec.num_blocks) * spec.block_size
        self.kv_cache = lazy_zeros(self.backend.kv_cache_shape(spec, slots), spec.format.dtype)
        self.layers = [m for m in model.modules() if isinstance(m, Attention)]
        self._built = None  # what a backend prepared (the fused step), kept across rebuilds
        for g, members in enumerate(spec.groups):
            for j, i in enumerate(members):
                attn = self.layers[i]
                attn.kv_cache = self.backend.layer_cache(self.kv_cache, j)
                attn.spec, attn.group = spec.layers[i], g
        self.select_kernels(native)

    def execute_kv_ops(self, ops: list[KVOp], on_saved) -> None:
        """Carry out the scheduler's page movements in order: a load writes its page into its
        block, a copy its source block's page; a save gathers its block's page and hands it to
        `on_saved(op, page)`."""
        bs = self.spec.block_size
        for op in ops:
            if op.is_load:
                self.backend.write_page(self.kv_cache, op.block_id, bs, op.payload)
            elif op.kind == "copy":
                page = self.backend.read_page(self.kv_cache, op.src, bs)
                self.backend.write_page(self.kv_cache, op.block_id, bs, page)
            else:
                on_saved(op, self.backend.read_page(self.kv_cache, op.block_id, bs))

    def select_kernels(self, native: bool) -> None:
        """Settle which native kernels the model's modules run and build the attention backend.
        Called once at build; tests and A/B benchmarks call it again after `kernels.set_enabled`
        to rebuild on the other paths."""
        kernels.select(self.model, native)
        store = getattr(self.model, "expert_store", None)
        if store is not None:  # experts on disk: their slot modules follow the same choice
            store.set_native(native)
        backend = make_backend(self.config, native)
        if backend.kv_cache_shape(self.spec, 1) != self.backend.kv_cache_shape(self.spec, 1):
            raise RuntimeError(f"{backend.name} lays the KV cache out differently")
        self.backend = backend
        for attn in self.layers:
            attn.backend = self.backend
        built = self.backend.bind(self.model, self.kv_cache, self.spec.block_size, self._built)
        self._built = built or self._built

    @property
    def native_step(self):
        """The fused native decode step, when the backend has one for this model."""
        return getattr(self.backend, "step", None)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one step; returns (R, V) logits for `plan.logits_rows` (None when R is 0)."""
        metadata = {
            g: self.backend.build_metadata(plan.group(g), s) for g, s in enumerate(self.group_specs)
        }
        ctx = ForwardContext(plan.slot_mapping, metadata, plan.group_slots)
        with forward_context(ctx):
            hidden = self.backend.run_model(self.model, plan, ctx)
        if not len(plan.logits_rows):
            return None
        if len(plan.logits_rows) != hidden.shape[0]:
            hidden = hidden[plan.logits_rows]
        return self.model.compute_logits(hidden)
