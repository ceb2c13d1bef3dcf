"""GGUF <-> Hugging Face tensor names, as data. `{i}` is the layer index."""

import re

# GGUF name -> HF name. Our modules use HF names, so a safetensors checkpoint needs no mapping.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    # Mixtures of experts: the router, the experts stacked in one tensor each (`{e}`: split
    # along the outer dimension, one HF tensor per expert), the shared expert and its gate.
    "blk.{i}.ffn_gate_inp.weight": "model.layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "blk.{i}.ffn_up_exps.weight": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "blk.{i}.ffn_down_exps.weight": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "blk.{i}.ffn_gate_shexp.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "blk.{i}.ffn_up_shexp.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "blk.{i}.ffn_down_shexp.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "blk.{i}.ffn_gate_inp_shexp.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
}

# Tensors llama.cpp's converter stores with its rotary row permutation, per GGUF architecture.
# Qwen2 uses NeoX-style rotary in llama.cpp and is stored unpermuted.
PERMUTED_QK = {
    "llama": ("attn_q", "attn_k"),
}

# Tensors the runtime never reads (precomputed rotary tables some converters add).
# Read into the config, not weights: rope_freqs.weight holds Llama 3.x's per-frequency factors.
ROPE_FREQS = "rope_freqs.weight"
IGNORED = (ROPE_FREQS, "rope_factors_long.weight", "rope_factors_short.weight")


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for src, dst in table.items():
        pattern = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        out.append((re.compile(pattern + "$"), dst))
    return out


_GGUF_PATTERNS = _compile(GGUF_TO_HF)

# A model's own names (its class's `gguf_names`) are tried before the common table.
_OWN: dict[tuple, list] = {}


def gguf_to_hf(name: str, own: dict[str, str] | None = None) -> str | None:
    """The HF name of a GGUF tensor, or None if neither `own` nor the common table knows it."""
    patterns = _GGUF_PATTERNS
    if own:
        key = tuple(own.items())
        if key not in _OWN:
            _OWN[key] = _compile(own) + _GGUF_PATTERNS
        patterns = _OWN[key]
    for pattern, dst in patterns:
        m = pattern.match(name)
        if m:
            return dst.replace("{i}", m.group("i")) if "i" in m.groupdict() else dst
    return None
