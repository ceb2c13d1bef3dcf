"""Qwen2-MoE and Qwen3-MoE: the Llama decoder (Qwen2's q/k/v biases, Qwen3's per-head q/k
norms) with a mixture of experts in place of the MLP in its sparse layers. Qwen2-MoE adds a
shared expert scaled by a sigmoid gate; Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B) has none and
renormalizes its top-k weights."""

from __future__ import annotations

from torch import nn

from slimserve.config import ModelConfig
from slimserve.layers.embedding import LMHead
from slimserve.layers.moe import SparseMoE
from slimserve.models.llama import LlamaForCausalLM, LlamaModel


def link_sparse_layers(model: nn.Module) -> None:
    """Give each sparse layer the next one, whose router predicts what to read ahead."""
    sparse = [m for m in model.modules() if isinstance(m, SparseMoE)]
    for a, b in zip(sparse, sparse[1:]):
        a._next = [b]  # a list: not a submodule


def gguf_moe_fields(meta, found: dict) -> dict:
    """The experts' fields llama.cpp writes for every MoE architecture."""
    a = found["architecture"]
    return dict(
        num_experts=int(meta(f"{a}.expert_count", 0) or 0),
        num_experts_per_tok=int(meta(f"{a}.expert_used_count", 0) or 0),
        moe_intermediate_size=int(
            meta(f"{a}.expert_feed_forward_length", 0) or found["intermediate_size"]
        ),
        shared_expert_intermediate_size=int(meta(f"{a}.expert_shared_feed_forward_length", 0)),
    )


def sparse_layers(c: dict, n: int) -> tuple[bool, ...]:
    """Qwen-MoE's sparse layers: every `decoder_sparse_step`-th, less `mlp_only_layers`."""
    step, dense = c.get("decoder_sparse_step") or 1, set(c.get("mlp_only_layers") or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(n))


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        tied = self.lm_head if cfg.tie_word_embeddings else None
        self.model = LlamaModel(
            cfg, tied, lambda i: SparseMoE(cfg, i) if cfg.is_moe_layer(i) else None
        )
        link_sparse_layers(self)

    @staticmethod
    def gguf_config(meta, found: dict) -> dict:
        qwen3 = found["architecture"] == "qwen3moe"
        return dict(found, qk_norm=qwen3, norm_topk_prob=qwen3, **gguf_moe_fields(meta, found))

    @staticmethod
    def hf_config(c: dict, found: dict) -> dict:
        qwen3 = found["architecture"].startswith("Qwen3")
        return dict(
            found,
            qk_norm=qwen3,
            attention_bias=bool(c.get("attention_bias", c.get("qkv_bias", not qwen3))),
            num_experts=int(c.get("num_experts") or c.get("num_local_experts") or 0),
            num_experts_per_tok=int(c["num_experts_per_tok"]),
            moe_intermediate_size=int(c["moe_intermediate_size"]),
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(c.get("shared_expert_intermediate_size") or 0),
            moe_layers=sparse_layers(c, found["num_layers"]),
        )


Qwen3MoeForCausalLM = Qwen2MoeForCausalLM  # the config says which parts a layer has
