"""Experts kept on disk under a memory cap (`--expert-cache-memory`): the experts file.

An MoE model's experts are most of its bytes and few of them run for a token, so they need not
all be in RAM. At load, each expert's packed tensors (exactly what its kernels read) are written
once, record after record, to an experts file beside the packed model, and the model keeps only
its dense part plus, per sparse layer, a template of an expert's module tree on the meta device.
`loader/expert_store.py` serves the records from a RAM cache of slots at run time.
"""

from __future__ import annotations

import atexit
import copy
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from slimserve.errors import InvalidRequest, ModelLoadError

ALIGN = 64  # every tensor of a record starts on a cache line (and the kernels' alignment)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module tree's parameters and buffers, in a fixed order."""
    return list(module.named_parameters()) + list(module.named_buffers())


@dataclass(frozen=True)
class Layout:
    """Where a sparse layer's experts sit in the experts file: record e of the layer starts at
    `offset + e * record`; `fields` is (name, dtype, shape, offset in the record) per tensor."""

    offset: int
    record: int
    num_experts: int
    fields: tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]


def _layout_of(expert: nn.Module, offset: int, num_experts: int) -> Layout:
    fields, at = [], 0
    for name, t in _tensors(expert):
        fields.append((name, t.dtype, tuple(t.shape), at))
        at += _align(t.numel() * t.element_size())
    return Layout(offset, _align(at), num_experts, tuple(fields))


def _like(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """`data` as `t` is held: a frozen Parameter if `t` is one, else a plain tensor."""
    return nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data


def _meta_template(expert: nn.Module) -> nn.Module:
    """The expert's module tree with every tensor on the meta device (shapes, no bytes)."""
    memo = {}
    for _, t in _tensors(expert):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = _like(t, meta)
    return copy.deepcopy(expert, memo)


def moe_layers(model: nn.Module) -> list:
    from slimserve.layers.moe import SparseMoE

    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def strip_experts(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every sparse layer's experts to `path` and drop them from the model, leaving each
    layer its `Layout` and meta template (which the packed model's pickle keeps)."""
    layers = moe_layers(model)
    if not layers:
        raise InvalidRequest("--expert-cache-memory applies to mixture-of-experts models only")
    offset = 0
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            for moe in layers:
                experts = list(moe.experts)
                layout = _layout_of(experts[0], offset, len(experts))
                want = [(n, d, s) for n, d, s, _ in layout.fields]
                for e, expert in enumerate(experts):
                    got = [(n, t.dtype, tuple(t.shape)) for n, t in _tensors(expert)]
                    if got != want:  # one stacked tensor per layer: every expert packs alike
                        raise ModelLoadError(
                            f"layer {moe.layer} expert {e} is packed unlike expert 0 ({got} vs "
                            f"{want}); its experts cannot share one record layout"
                        )
                    for _, t in _tensors(expert):
                        data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
                        f.write(data)
                        f.write(bytes(_align(data.nbytes) - data.nbytes))
                    f.write(bytes(layout.record - sum(_align(t.numel() * t.element_size())
                                                      for _, t in _tensors(expert))))
                moe.expert_layout = layout
                moe._template = [_meta_template(experts[0])]
                moe.experts = nn.ModuleList()
                offset += layout.record * len(experts)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def experts_file_size(model: nn.Module) -> int:
    return sum(m.expert_layout.record * m.expert_layout.num_experts for m in moe_layers(model))


def temporary_experts_path() -> str:
    """Where the experts go when the artifact cache is off: a file removed at exit."""
    fd, path = tempfile.mkstemp(prefix="slimserve-experts-", suffix=".bin")
    os.close(fd)
    atexit.register(lambda: os.path.exists(path) and os.unlink(path))
    return path
