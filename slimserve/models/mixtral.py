"""Mixtral (8x7B, 8x22B): the Mistral decoder with 8 SwiGLU experts a layer, 2 chosen a token,
their weights renormalized. HF checkpoints name the block `block_sparse_moe` and the expert
linears w1 (gate), w3 (up) and w2 (down); llama.cpp stores Mixtral as architecture `llama` with
an expert count, and its stacked expert tensors under the common MoE names (loader/names.py)."""

from __future__ import annotations

from torch import nn

from slimserve.config import ModelConfig
from slimserve.layers.embedding import LMHead
from slimserve.layers.moe import SparseMoE
from slimserve.models.llama import LlamaForCausalLM, LlamaModel
from slimserve.models.qwen_moe import gguf_moe_fields, link_sparse_layers
from slimserve.models.weights import load_weights


class MixtralForCausalLM(LlamaForCausalLM):
    packed_modules = dict(
        LlamaForCausalLM.packed_modules,
        w1=("gate_up_proj", 0),
        w3=("gate_up_proj", 1),
        w2=("down_proj", 0),
    )

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.config = cfg
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        tied = self.lm_head if cfg.tie_word_embeddings else None
        self.model = LlamaModel(cfg, tied, lambda i: SparseMoE(cfg, i))
        link_sparse_layers(self)

    def load_weights(self, weights) -> None:
        renamed = ((n.replace(".block_sparse_moe.", ".mlp."), t) for n, t in weights)
        skip = ("lm_head.",) if self.config.tie_word_embeddings else ()
        load_weights(self, renamed, self.packed_modules, skip)

    @staticmethod
    def gguf_config(meta, found: dict) -> dict:
        fields = gguf_moe_fields(meta, dict(found, architecture="llama"))
        return dict(found, architecture="mixtral", **fields)

    @staticmethod
    def hf_config(c: dict, found: dict) -> dict:
        return dict(
            found,
            num_experts=int(c["num_local_experts"]),
            num_experts_per_tok=int(c["num_experts_per_tok"]),
            moe_intermediate_size=found["intermediate_size"],
        )
