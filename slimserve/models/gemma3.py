"""Gemma 3 (text): sandwich RMSNorms around attention and MLP, per-head q/k norms, a GELU-tanh
gated MLP, embeddings scaled by sqrt(hidden), interleaved sliding-window and global layers with
their own RoPE bases, and tied embeddings.

Gemma's RMSNorm multiplies by (1 + w). Checkpoints store w; llama.cpp's converter stores 1 + w in
GGUF files. Weights reach the model in the HF convention (`gguf_tensor` takes the 1 back off),
and `OffsetRMSNorm` adds it once at load, so the forward pass is a plain RMSNorm.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from slimserve.config import ModelConfig
from slimserve.layers.activation import GeluTanhAndMul
from slimserve.layers.embedding import LMHead, VocabEmbedding
from slimserve.layers.norm import RMSNorm
from slimserve.layers.rotary import RotaryEmbedding
from slimserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from slimserve.models.weights import load_weights

# llama.cpp writes neither of these for Gemma 3 and assumes them (llama-model.cpp): window layers
# use RoPE base 10000, and every sixth layer is global.
GGUF_LOCAL_ROPE_BASE = 10000.0
GGUF_WINDOW_PATTERN = 6


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: loads w and keeps 1 + w."""

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        self.weight.copy_(tensor + 1.0)


class Gemma3Attention(LlamaAttention):
    """Llama's attention with Gemma's q/k norms and scale; a window layer rotates with the
    local RoPE table."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: int):
        super().__init__(cfg, rotary, OffsetRMSNorm)
        self.window = window  # 1 for a window layer: the index of its table in `ropes`
        self.attn.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

    def forward(self, ropes, x: torch.Tensor) -> torch.Tensor:
        return super().forward(ropes[self.window], x)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, window: bool):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.self_attn = Gemma3Attention(cfg, rotary, window)
        self.post_attention_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)
        self.mlp = LlamaMLP(cfg, GeluTanhAndMul)
        self.post_feedforward_layernorm = OffsetRMSNorm(cfg.hidden_size, eps)

    def forward(self, ropes, x, residual):
        """x: the previous layer's output, not yet added to the residual stream."""
        h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(ropes, h))[0]
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h))[0], residual


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, tied_head: LMHead | None):
        super().__init__()
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        global_rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, scaling)
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        local_rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, local_theta)
        self.rotaries = nn.ModuleList([global_rope, local_rope])  # index: is a window layer
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tied_head)
        # HF keeps sqrt(hidden) as a tensor of the embedding's dtype, float32 here.
        self.embed_scale = float(torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32))
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, self.rotaries[int(w)], int(w))
            for w in (cfg.is_window_layer(i) for i in range(cfg.num_layers))
        )
        self.norm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids) * self.embed_scale, None
        ropes = [r.table(positions) for r in self.rotaries]  # once per step for every layer
        for layer in self.layers:
            x, residual = layer(ropes, x, residual)
        return self.norm(x, residual)[0]


class Gemma3ForCausalLM(LlamaForCausalLM):
    # GGUF names where Gemma 3 differs from the common table (loader/names.py).
    gguf_names = {
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    }

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        self.model = Gemma3Model(cfg, self.lm_head if cfg.tie_word_embeddings else None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap

    def load_weights(self, weights) -> None:
        load_weights(self, weights, self.packed_modules, ("lm_head.",))

    # -- its description in checkpoints ----------------------------------------------------------
    @staticmethod
    def gguf_config(meta, found: dict) -> dict:
        n = found["num_layers"]
        window = int(meta("gemma3.attention.sliding_window", 0) or 0)
        return dict(
            found,
            qk_norm=True,
            sliding_window=window,
            window_layers=tuple((i + 1) % GGUF_WINDOW_PATTERN != 0 for i in range(n)),
            rope_local_theta=GGUF_LOCAL_ROPE_BASE,
            query_pre_attn_scalar=float(found["head_dim"]),
            final_logit_softcapping=meta("gemma3.final_logit_softcapping"),
        )

    @staticmethod
    def gguf_tensor(hf_name: str, w: np.ndarray) -> np.ndarray:
        return w - 1.0 if hf_name.endswith("norm.weight") else w

    @staticmethod
    def hf_config(c: dict, found: dict) -> dict:
        n = found["num_layers"]
        types = c.get("layer_types")
        if types is None:
            pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
            types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(n)
            ]
        params = c.get("rope_parameters") or {}
        full = params.get("full_attention", {})
        local = params.get("sliding_attention", {})
        theta = full.get("rope_theta") or c.get("rope_theta") or 1_000_000.0
        local_theta = local.get("rope_theta") or c.get("rope_local_base_freq") or 10_000.0
        scaling = full if full.get("rope_type", "default") != "default" else c.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        if c.get("attn_logit_softcapping"):
            from slimserve.errors import UnsupportedModel

            raise UnsupportedModel("Gemma attention logit soft-capping (Gemma 2) is not supported")
        return dict(
            found,
            qk_norm=True,
            tie_word_embeddings=c.get("tie_word_embeddings", True),
            attention_bias=bool(c.get("attention_bias", False)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(
                (k, v) for k, v in scaling.items() if k != "rope_theta"
            )) if scaling else None,
            sliding_window=int(c.get("sliding_window") or 0),
            window_layers=tuple(t != "full_attention" for t in types),
            rope_local_theta=float(local_theta),
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or found["head_dim"]),
            final_logit_softcapping=c.get("final_logit_softcapping"),
        )  # fmt: skip
