"""The decode step of a Llama-family model with int4 weights as one native call.

When every row of a step decodes (one token, or a verify of drafts: each row is one query with its
own block-table row and length), the native backend calls this instead of the model's modules:
kernels/decode_step.c runs every layer and the final norm in one parallel region,
composing the same kernels the modules call one at a time, so the result is bit-identical and
only the per-op overhead goes (about 40% of a batch-1 step). The token embedding and the LM head
stay with the modules: one call each.

`NativeDecodeStep.build` returns None for a model it does not take (another layer structure,
weights that are not Int4Linear, a CUDA model); the backend then keeps the modules.
"""

from __future__ import annotations

import ctypes

import torch

from slimserve import kernels
from slimserve.layers.activation import SiluAndMul
from slimserve.layers.norm import RMSNorm
from slimserve.quant.int4 import Int4Linear

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

# What the step composes: turning any of them off (for an A/B run) turns the step off too.
PARTS = ("decode_step", "int4_matmul", "add_rms_norm", "rope", "write_kv",
         "paged_decode_attention", "silu_mul")  # fmt: skip


class _Int4Weight(ctypes.Structure):
    _fields_ = [("packed", _p), ("sz", _p), ("bias", _p)] + [
        (n, _i64) for n in ("K", "doubled", "n_pad", "group", "n_out", "eight_bit")
    ]

    @classmethod
    def of(cls, lin: Int4Linear) -> _Int4Weight:
        bias = lin.bias.data_ptr() if lin.bias is not None else None
        return cls(
            lin.packed.data_ptr(),
            lin.scales_zeros.data_ptr(),
            bias,
            lin.in_features,
            int(lin.doubled),
            lin.scales_zeros.shape[1],
            lin.group,
            lin.out_features,
            int(lin.eight_bit),
        )


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_attention_norm", _p)]
    _fields_ += [(n, _Int4Weight) for n in ("qkv", "o", "gate_up", "down")]
    _fields_ += [("k_cache", _p), ("v_cache", _p)]


class _Model(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")]
    _fields_ += [("eps", _f32), ("scale", _f32), ("cos", _p), ("sin", _p), ("final_norm", _p)]
    _fields_ += [(n, _i64) for n in ("slots", "kind", "block_size")]


class _Batch(ctypes.Structure):
    _fields_ = [("M", _i64), ("positions", _p), ("slot_mapping", _p), ("tables", _p)]
    _fields_ += [("lens", _p), ("max_blocks", _i64), ("x", _p)]


def _layer_parts(layer) -> tuple | None:
    """A decoder layer's (norm, qkv, o, norm, gate_up, down, attention), or None when it is not
    a pre-norm RMSNorm / int4 / SwiGLU layer of the shape the native step composes."""
    try:
        attn, mlp = layer.self_attn, layer.mlp
        parts = (
            layer.input_layernorm,
            attn.qkv_proj,
            attn.o_proj,
            layer.post_attention_layernorm,
            mlp.gate_up_proj,
            mlp.down_proj,
            attn.attn,
        )
    except AttributeError:
        return None
    if getattr(attn, "qk_norm", False):  # per-head q/k norms (Qwen3): not in the native step
        return None
    kinds = (RMSNorm, Int4Linear, Int4Linear, RMSNorm, Int4Linear, Int4Linear)
    if not all(type(m) is k for m, k in zip(parts, kinds)) or type(mlp.act) is not SiluAndMul:
        return None
    return parts


class NativeDecodeStep:
    """Callable like the model for an all-decode step: (input_ids, positions) -> hidden."""

    def __init__(self, cfg, inner: torch.nn.Module, layers: list, block_size: int):
        """inner: the decoder stack (norm, rotary, embed_tokens); layers: `_layer_parts` of each
        of its layers, whose attention holds its bound (Hkv, slots, row) cache pair."""
        rotary, final_norm, cache = inner.rotary, inner.norm, layers[0][6].kv_cache[0]
        self.embed = inner.embed_tokens
        self._keep = []  # every tensor whose address the structs hold, alive while they are
        self.layers = (_Layer * len(layers))()
        for i, (n1, qkv, o, n2, gu, down, attn) in enumerate(layers):
            k, v = attn.kv_cache
            self.layers[i] = _Layer(
                n1.weight.data_ptr(),
                n2.weight.data_ptr(),
                *map(_Int4Weight.of, (qkv, o, gu, down)),
                k.data_ptr(),
                v.data_ptr(),
            )
            self._keep += [n1.weight, n2.weight, k, v]
            for lin in (qkv, o, gu, down):
                self._keep += [lin.packed, lin.scales_zeros, lin.bias]
        attn = layers[0][6]
        self.model = _Model(
            cfg.hidden_size,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            cfg.intermediate_size,
            layers[0][0].eps,
            attn.scale,
            rotary.cos.data_ptr(),
            rotary.sin.data_ptr(),
            final_norm.weight.data_ptr(),
            cache.shape[1],
            kernels.row_kind(cache.dtype),
            block_size,
        )
        self._keep += [final_norm.weight]
        self.rotary, self._tables = rotary, (rotary.cos, rotary.sin)  # kept alive: in the struct
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self.steps = 0  # steps run natively, for tests and logs

    @classmethod
    def build(
        cls, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int
    ) -> NativeDecodeStep | None:
        """The native step for `model` (its layers bound to `kv_cache`, of `block_size`-token
        blocks), or None when the model is not one it composes or the kernels are not there."""
        if not all(kernels.available(k) for k in PARTS):
            return None
        inner = getattr(model, "model", None)
        rotary = getattr(inner, "rotary", None)
        layers = [_layer_parts(layer) for layer in getattr(inner, "layers", [None])]
        if (
            rotary is None
            or None in layers
            or type(getattr(inner, "norm", None)) is not RMSNorm
            or rotary.cos.dtype != torch.float32
            or kv_cache.device.type != "cpu"
            or next(model.buffers()).device.type != "cpu"
        ):
            return None
        step = cls(model.config, inner, layers, block_size)
        one = torch.ones(1, dtype=torch.long)  # a batch of one 1-token sequence, to ask with
        probe = _Batch(1, None, None, None, one.data_ptr(), 1, None)
        if kernels.decode_scratch_bytes(step.model, step.layers, probe) < 0:
            return None
        return step

    @staticmethod
    def takes(groups) -> bool:
        """Whether a step's attention groups are ones the native call runs: one group of decode
        rows read in place (no cascade, no prompt chunk)."""
        if len(groups) != 1:
            return False
        g = groups[0]
        return g.seq_lens is not None and g.seq_begins is None and g.shared is None and g.q_len == 1

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, g
    ) -> torch.Tensor:
        self.rotary.cover(positions)
        if self.rotary.cos is not self._tables[0]:  # the tables grew: point the struct at them
            self._tables = (self.rotary.cos, self.rotary.sin)
            self.model.cos, self.model.sin = (t.data_ptr() for t in self._tables)
        x = self.embed(input_ids).contiguous()
        M = x.shape[0]
        tables = g.kv_indices
        batch = _Batch(
            M,
            positions.data_ptr(),
            slot_mapping.data_ptr(),
            tables.data_ptr(),
            g.seq_lens.data_ptr(),
            tables.shape[1],
            x.data_ptr(),
        )
        need = kernels.decode_scratch_bytes(self.model, self.layers, batch)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.uint8)
        kernels.decode_layers(self.model, self.layers, batch, self._scratch)
        self.steps += 1
        return x
