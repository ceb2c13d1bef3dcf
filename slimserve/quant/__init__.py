"""Weight quantization as a module swap: models never import this package.

`prepare` swaps each Linear (and the LM head and embedding) for a collector before weights load;
the loader hands it float tensors, or raw GGUF blocks for the formats named in `keep_types`;
`finalize` swaps each collector for its packed int4-kernel module (`int4.py`).

Methods:
  gguf  GGUF weights stay in their blocks: Q4_0/Q4_1/Q4_K exactly as 4-bit groups, Q8_0 as
        8-bit; tensors in other formats are dequantized, then rounded to int8 per 32 weights.
  int4  round-to-nearest asymmetric int4 per group (32, 64 or 128) of a float checkpoint's
        linears; its LM head and embedding get int8.
  int8  round-to-nearest symmetric int8 per group of 32 of a float checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from slimserve.errors import InvalidRequest
from slimserve.layers.embedding import LMHead, VocabEmbedding
from slimserve.layers.linear import Linear
from slimserve.loader.resolve import QuantizedTensor
from slimserve.quant import gguf_blocks
from slimserve.quant.int4 import (
    Int4Linear,
    PackedEmbedding,
    int4_as_doubled,
    int8_as_int4,
    quantize_int4,
    quantize_int8,
)
from slimserve.quant.int8 import Int8Linear

METHODS = ("gguf", "int4", "int8")
GROUP_SIZES = (32, 64, 128)
FLOAT_TYPES = ("F32", "F16", "BF16")


def resolve_method(requested: str | None, source, group_size: int = 32) -> str | None:
    """The method to load `source` with (None: float32). None and "auto" pick "gguf" for a GGUF
    whose weights are in a block format the int4 kernel reads, as llama.cpp runs it; "none"
    dequantizes everything to float32. Bad combinations raise InvalidRequest."""
    stored = source.tensor_types()
    quantized = sorted(stored - set(FLOAT_TYPES))
    if requested == "none":
        return None
    if requested in (None, "auto"):
        return "gguf" if stored & set(gguf_blocks.SUPPORTED) else None
    if requested not in METHODS:
        raise InvalidRequest(
            f"unknown quantization {requested!r}; supported: auto, none, {', '.join(METHODS)}",
            param="quantization",
        )
    if group_size not in GROUP_SIZES or (requested != "int4" and group_size != 32):
        raise InvalidRequest(
            f"quantization group size {group_size} is not supported for {requested}; int4 takes "
            f"{', '.join(map(str, GROUP_SIZES))}, the others 32",
            param="quantization_group_size",
        )
    if requested == "gguf" and not stored:
        raise InvalidRequest(
            f"--quantization gguf keeps a GGUF file's blocks; {source.name} is not a GGUF file",
            param="quantization",
        )
    if requested in ("int4", "int8") and quantized:
        raise InvalidRequest(
            f"{source.name} is already quantized ({', '.join(quantized)}); re-quantizing it to "
            f"{requested} would stack two roundings. Use --quantization gguf to run its own "
            "blocks, or none for float32",
            param="quantization",
        )
    return requested


def keep_types(method: str | None) -> frozenset[str]:
    """Block formats the loader should hand over undecoded for `method`."""
    return frozenset(gguf_blocks.SUPPORTED) if method == "gguf" else frozenset()


# What a collector's matrix is for: the LM head and embedding tables get 8 bits where a layer
# would get 4, and may be held one byte a weight.
LINEAR, HEAD, TABLE = "linear", "head", "table"


class _Pending(nn.Module):
    """Collects one Linear's shards as they load; `build` packs them."""

    def __init__(self, linear: Linear, method: str, group: int, role: str = LINEAR):
        super().__init__()
        in_features = linear.in_features
        self.in_features, self.output_sizes = in_features, linear.output_sizes
        self.method, self.role = method, role
        self.native = True  # whether native kernels may run it: set by `finalize`
        # The requested group, or the largest smaller one that tiles this layer's inputs (a
        # hidden size of 576 takes groups of 64, not 128); 0 when none does.
        self.group = next((g for g in GROUP_SIZES[::-1] if g <= group and not in_features % g), 0)
        # A placeholder so the loader expects (and checks) every shard of `weight`.
        self.weight = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
        self.bias = linear.bias
        self.shards: dict[int, QuantizedTensor | torch.Tensor] = {}

    def load(self, name: str, tensor, shard: int = 0) -> None:
        want = (self.output_sizes[shard], self.in_features)
        if name == "bias":
            start = sum(self.output_sizes[:shard])
            self.bias[start : start + want[0]].copy_(tensor)
            return
        if tuple(tensor.shape) != want:
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {want}")
        self.shards[shard] = tensor

    def _groups(self, t):
        """One shard -> ("4", codes, scale, zero) or ("8", codes, d)."""
        if isinstance(t, QuantizedTensor):
            if t.kind in gguf_blocks.EIGHT_BIT:
                return ("8", *gguf_blocks.decode_q8_0(t.blocks, t.shape[1]))
            return ("4", *gguf_blocks.decode_4bit(t.kind, t.blocks, t.shape[1]))
        if self.method == "int4" and self.role == LINEAR:
            return ("4", *quantize_int4(t.float(), self.group))
        # int8 otherwise: also int4's LM head and embedding, which the quality hangs on most (as
        # llama.cpp's Q4_K_M keeps its output matrix at 6 bits)
        return ("8", *quantize_int8(t.float()))

    def build(self) -> nn.Module:
        shards = [self.shards[i] for i in range(len(self.output_sizes))]
        if not self.group:  # the kernel's groups can't tile K: stay in float
            return self._as_float(shards)
        parts = [self._groups(t) for t in shards]
        if self.role != LINEAR and all(p[0] == "8" for p in parts):
            # the LM head or an embedding table, 8-bit: one byte a weight where the kernel runs
            q, d = (torch.cat(x) for x in zip(*(p[1:] for p in parts)))
            if Int8Linear.takes(q, d, self.native):
                return Int8Linear(
                    q,
                    d,
                    in_features=self.in_features,
                    output_sizes=self.output_sizes,
                    bias=self.bias,
                )
        if any(p[0] == "8" for p in parts):
            parts = [(int8_as_int4 if p[0] == "8" else int4_as_doubled)(*p[1:]) for p in parts]
        else:
            parts = [p[1:] for p in parts]
        codes, scale, zero = (torch.cat(x) for x in zip(*parts))
        return Int4Linear(
            codes,
            scale,
            zero,
            in_features=self.in_features,
            output_sizes=self.output_sizes,
            bias=self.bias,
        )

    def _as_float(self, shards) -> nn.Module:
        if any(isinstance(t, QuantizedTensor) for t in shards):
            raise InvalidRequest(f"in_features {self.in_features} is not a multiple of 32")
        if self.role == LINEAR:
            lin = Linear(self.in_features, self.output_sizes, bias=self.bias is not None)
        else:  # the LM head or an embedding table: (vocab, hidden)
            lin = LMHead(self.output_sizes[0], self.in_features)
        for i, t in enumerate(shards):
            lin.load("weight", t, i)
        if self.bias is not None:
            lin.bias = self.bias
        return lin


class _PendingTiedEmbedding(nn.Module):
    """The tied embedding's tensor loads into the head's collector."""

    def __init__(self, head: _Pending):
        super().__init__()
        self.tied_head = head

    def load(self, name: str, tensor, shard: int = 0) -> None:
        self.tied_head.load(name, tensor, shard)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare(model: nn.Module, method: str, group: int = 32) -> None:
    """Before loading: every Linear, the LM head and the embedding become collectors."""
    heads = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, LMHead):
            heads[module] = _Pending(module, method, group, HEAD)
            _swap(model, name, heads[module])
        elif isinstance(module, Linear):
            _swap(model, name, _Pending(module, method, group))
    for name, module in list(model.named_modules()):
        if isinstance(module, VocabEmbedding):
            if module.tied_head is not None:
                _swap(model, name, _PendingTiedEmbedding(heads[module.tied_head]))
            else:
                table = Linear(module.weight.shape[1], [module.weight.shape[0]])
                _swap(model, name, _Pending(table, method, group, TABLE))


def finalize(model: nn.Module, native: bool = True) -> nn.Module:
    """After loading: collectors become packed modules; embeddings read their packed table (a
    tied one, the head's). A layer whose width the kernel's groups can't tile stays float.
    `native` False keeps layouts the PyTorch kernels read (no one-byte 8-bit tables)."""
    built = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, _Pending):
            module.native = native
            built[module] = new = module.build()
            if module.role == TABLE:
                new = _embedding(new, tied=False)
            _swap(model, name, new)
    for name, module in list(model.named_modules()):
        if isinstance(module, _PendingTiedEmbedding):
            _swap(model, name, _embedding(built[module.tied_head], tied=True))
    return model


def _embedding(table: nn.Module, tied: bool) -> nn.Module:
    if isinstance(table, (Int4Linear, Int8Linear)):
        return PackedEmbedding(table, tied)
    vocab, hidden = table.output_sizes[0], table.in_features  # a float fallback
    if tied:
        return VocabEmbedding(vocab, hidden, tied_head=table)
    emb = VocabEmbedding(vocab, hidden)
    emb.weight = nn.Parameter(table.weight.t().contiguous(), requires_grad=False)
    return emb


__all__ = ["METHODS", "finalize", "keep_types", "prepare", "resolve_method"]
