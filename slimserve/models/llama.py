"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3): pre-norm decoder, RoPE, GQA,
SwiGLU; Qwen3 adds an RMSNorm over each query and key head."""

import torch
from torch import nn

from slimserve.config import ModelConfig
from slimserve.layers.activation import SiluAndMul
from slimserve.layers.attention import Attention
from slimserve.layers.embedding import LMHead, VocabEmbedding
from slimserve.layers.linear import Linear
from slimserve.layers.norm import RMSNorm
from slimserve.layers.rotary import RotaryEmbedding
from slimserve.models.weights import load_weights


def qk_normed(attn: nn.Module, qkv: torch.Tensor, T: int):
    """(q, k, v) heads of a packed projection, q and k through the layer's per-head RMSNorms:
    q (T, H, D), k and v (T, Hkv, D)."""
    D = attn.attn.head_dim
    q, k, v = qkv.split(attn.sizes, dim=-1)
    q = attn.q_norm(q.reshape(-1, D))[0].view(T, -1, D)
    k = attn.k_norm(k.reshape(-1, D))[0].view(T, -1, D)
    return q, k, v.view(T, -1, D)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, norm=RMSNorm):
        """norm: the class of the q/k norms, when the config has them."""
        super().__init__()
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sizes = [H * D, Hkv * D, Hkv * D]
        self.qkv_proj = Linear(cfg.hidden_size, self.sizes, bias=cfg.attention_bias)
        self.o_proj = Linear(H * D, [cfg.hidden_size])
        if cfg.qk_norm:
            self.q_norm = norm(D, cfg.rms_norm_eps)
            self.k_norm = norm(D, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary = rotary
        self.attn = Attention(H, Hkv, D)

    def forward(self, rope, x: torch.Tensor) -> torch.Tensor:
        T, D, H = x.shape[0], self.attn.head_dim, self.attn.num_heads
        qkv = self.qkv_proj(x)
        if self.qk_norm:
            q, k, v = qk_normed(self, qkv, T)
            return self.o_proj(
                self.attn(self.rotary.rotate(rope, q), self.rotary.rotate(rope, k), v)
            )
        # q and k heads sit side by side in qkv: one rotation covers both.
        qk = self.rotary.rotate(rope, qkv[:, : self.sizes[0] + self.sizes[1]].view(T, -1, D))
        v = qkv[:, self.sizes[0] + self.sizes[1] :].view(T, -1, D)
        return self.o_proj(self.attn(qk[:, :H], qk[:, H:], v))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, act: type[nn.Module] = SiluAndMul):
        """act: the gated activation over the packed (gate, up) output."""
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = Linear(cfg.intermediate_size, [cfg.hidden_size])
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, mlp: nn.Module | None = None):
        """mlp: the feed-forward block (a mixture of experts); None: the dense SwiGLU MLP."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else LlamaMLP(cfg)

    def forward(self, rope, x, residual):
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tied_head: LMHead | None, mlp=None):
        """mlp(i): layer i's feed-forward block, or None for the dense MLP."""
        super().__init__()
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        self.rotary = rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position, cfg.rope_theta, scaling
        )
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tied_head)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, mlp(i) if mlp else None) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.table(positions)  # once per step, shared by every layer
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # HF weight name -> (our packed module, shard index).
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size)
        self.model = LlamaModel(cfg, self.lm_head if cfg.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights) -> None:
        skip = ("lm_head.",) if self.config.tie_word_embeddings else ()
        load_weights(self, weights, self.packed_modules, skip)

    # -- its description in checkpoints: what the loader reads beyond the common fields --------
    gguf_names: dict[str, str] = {}  # GGUF -> HF names where this family differs

    @staticmethod
    def gguf_config(meta, found: dict) -> dict:
        """ModelConfig fields from GGUF metadata (`meta(key, default)`), given the common ones."""
        if found["architecture"] == "llama" and meta("llama.expert_count"):
            from slimserve.models.mixtral import MixtralForCausalLM  # llama.cpp's Mixtral

            return MixtralForCausalLM.gguf_config(meta, found)
        return dict(found, qk_norm=found["architecture"] == "qwen3")

    @staticmethod
    def hf_config(c: dict, found: dict) -> dict:
        """ModelConfig fields from config.json `c`, given the common ones."""
        return dict(found, qk_norm=found["architecture"].startswith("Qwen3"))

    @staticmethod
    def gguf_tensor(hf_name: str, w):
        """A GGUF tensor (float32 array) in the checkpoint convention the model loads."""
        return w
