"""Mixture-of-experts feed-forward: a router picks k experts a token, each expert is a SwiGLU MLP
run once over the tokens routed to it, and the outputs are summed with the router's weights.

Each expert is an ordinary module (`ExpertMLP`: packed gate/up and down linears), so
quantization swaps its linears like any other and HF checkpoints' per-expert tensors load by
name. When experts live on disk (`--expert-cache-memory`, loader/experts.py), `store` hands out
modules whose tensors sit in a slot of its RAM cache instead of `self.experts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.config import ModelConfig
from slimserve.layers.activation import SiluAndMul
from slimserve.layers.linear import Linear


class Router(nn.Module):
    """A small float linear, (out, in) as checkpoints store it, that quantization leaves alone:
    routing decisions are discrete, so the router (and a shared expert's scalar gate) keep the
    checkpoint's precision, as llama.cpp keeps `ffn_gate_inp` in F32."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def load(self, name: str, tensor, shard: int = 0) -> None:
        from slimserve.loader.resolve import QuantizedTensor

        if isinstance(tensor, QuantizedTensor):  # a GGUF whose router was stored in blocks
            tensor = _dequantize_blocks(tensor)
        if tensor.numel() != self.weight.numel():
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(self.weight.shape)}")
        self.weight.copy_(tensor.reshape(self.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _dequantize_blocks(t) -> torch.Tensor:
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = dequantize(t.blocks.numpy(), GGMLQuantizationType[t.kind]).astype(np.float32)
    return torch.from_numpy(w.reshape(t.shape))


def route(logits: torch.Tensor, k: int, norm: bool, order: str):
    """(T, E) router logits -> (weights f32 (T, k), expert ids int64 (T, k)).

    "softmax_topk": softmax over all experts, keep the k largest, renormalize them if `norm`
    (Qwen-MoE, Mixtral, OLMoE); "topk_softmax": the k largest logits, softmax over those
    (always summing to 1: the same choice as softmax_topk with `norm`, computed in fewer ops)."""
    logits = logits.float()
    if order == "topk_softmax":
        top, ids = logits.topk(k, dim=-1)
        return top.softmax(dim=-1), ids
    probs = logits.softmax(dim=-1)
    top, ids = probs.topk(k, dim=-1)
    if norm:
        top = top / top.sum(dim=-1, keepdim=True)
    return top, ids


class ExpertMLP(nn.Module):
    """One expert: silu(x W_gate) * (x W_up), then W_down. HF's gate_proj/up_proj (Mixtral's
    w1/w3) pack into gate_up_proj; down_proj (w2) loads as it is."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden, [intermediate] * 2)
        self.down_proj = Linear(intermediate, [hidden])
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    """Routed experts, plus an always-on shared expert where the family has one (Qwen2-MoE: its
    output scaled by sigmoid of a scalar gate)."""

    def __init__(self, cfg: ModelConfig, layer: int, shared_gate: bool = True):
        super().__init__()
        H, E = cfg.hidden_size, cfg.num_experts
        self.layer, self.top_k = layer, cfg.num_experts_per_tok
        self.norm, self.order = cfg.norm_topk_prob, cfg.router_order
        self.gate = Router(H, E)
        self.experts = nn.ModuleList(ExpertMLP(H, cfg.moe_intermediate_size) for _ in range(E))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = ExpertMLP(H, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Router(H, 1) if shared_gate else None
        else:
            self.shared_expert = None
        # Set when the experts live on disk (loader/experts.py): the store, and the next sparse
        # layer's router, whose scores on this layer's input predict what to read ahead.
        self.store = None
        self._next = []

    def predict(self, x: torch.Tensor) -> list[int]:
        """The experts this layer is likely to run for hidden states `x` of the layer before:
        its router's top-k on them, the k with the most routing weight over the tokens (a
        prefill's tokens would name nearly every expert; reading all of them ahead evicts more
        than it saves)."""
        weights, ids = route(self.gate(x), self.top_k, self.norm, self.order)
        if x.shape[0] == 1:
            return ids[0].tolist()
        mass = torch.zeros(len(self.gate.weight)).index_add_(0, ids.flatten(), weights.flatten())
        return mass.topk(self.top_k).indices.tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        weights, ids = route(self.gate(x), self.top_k, self.norm, self.order)
        store = self.store
        flat = ids.flatten()
        order = flat.argsort(stable=True)  # the (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.gate.weight)).tolist()
        tokens = order // self.top_k
        scale = weights.flatten()[order].unsqueeze(1).to(x.dtype)
        out = torch.zeros_like(x)
        active = [e for e, n in enumerate(counts) if n]
        modules = None
        if store is not None:
            modules = store.fetch(self.layer, active)  # this layer's reads first, then ahead
            if self._next:
                store.prefetch(self._next[0].layer, self._next[0].predict(x))
        start = 0
        for j, e in enumerate(active):
            end = start + counts[e]
            rows = tokens[start:end]
            xe = x if T == 1 else x[rows]
            if modules is None:
                y = self.experts[e](xe)
            else:
                y = modules.run(j, xe)
            out.index_add_(0, rows, y * scale[start:end])
            start = end
        if modules is not None:
            modules.close()
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out += shared
        return out
