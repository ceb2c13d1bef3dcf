"""Hugging Face safetensors directories: tiny random Llama, Qwen2, Qwen3 and Gemma 3 models
against transformers."""

import json

import pytest
import torch

from slimserve import LLM, SamplingParams

VOCAB = 49152


def make_hf_dir(tmp_path, llm, arch: str, **overrides):
    """Save a tiny random model with transformers, plus the real tokenizer's files."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        eos_token_id=2,
        bos_token_id=1,
    )
    common.update(overrides)
    prefix = {
        "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3", "qwen2moe": "Qwen2Moe",
        "qwen3moe": "Qwen3Moe", "mixtral": "Mixtral",
    }.get(arch, "Llama")  # fmt: skip
    config_name = "Gemma3TextConfig" if arch == "gemma3" else f"{prefix}Config"
    cfg = getattr(transformers, config_name)(**common)
    cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms start at 1 (or Gemma's w = 0): make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    llm.tokenizer.fast.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": llm.tokenizer.chat_template,
                "eos_token": "<|im_end|>",
                "bos_token": "<|im_start|>",
            }
        )
    )
    return model


CASES = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied-rope-llama3": (
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True)),
    # per-head q/k RMSNorms, a head_dim that is not hidden / heads
    "qwen3-qk-norm": ("qwen3", dict(tie_word_embeddings=True, head_dim=32)),
    # window layers around a global one (window 16 over 200 tokens, 64-token chunks), its own
    # attention scale, soft-capped logits, two RoPE bases; norms start at w = 0, i.e. 1 + w
    "gemma3-window": (
        "gemma3",
        dict(
            num_hidden_layers=3,
            head_dim=32,
            sliding_window=16,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0,
        ),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_directory_logits_match_transformers(tmp_path, llm, case):
    arch, overrides = CASES[case]
    ref_model = make_hf_dir(tmp_path, llm, arch, **overrides)
    ours = LLM(
        str(tmp_path), kv_cache_memory="16MiB", max_num_batched_tokens=64, kv_cache_dtype="float32"
    )
    cfg = ours.engine.model_config
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.qk_norm == (arch in ("qwen3", "gemma3"))
    if arch == "gemma3":
        assert [s.window for s in ours.engine.kv_spec.layers] == [16, 0, 16]
    ids = torch.randint(3, VOCAB, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    got = ours.engine.prompt_logits(ids)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    # Greedy through the engine (chunked prefill of 64-token chunks, then decode) agrees too.
    out = ours.generate([ids[:100]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    with torch.no_grad():
        hf = ref_model.generate(
            torch.tensor([ids[:100]]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 100:].tolist()
    assert out[0].outputs[0].token_ids == hf
    assert ours.tokenizer.eos_ids >= {2}


def test_qk_norm_models_never_take_the_fused_native_step(tmp_path, llm):
    """The fused decode step composes Llama layers; with per-head q/k norms (Qwen3) it would
    skip them, so such a model decodes through the modules even with int4 weights."""
    make_hf_dir(tmp_path, llm, "qwen3", tie_word_embeddings=True, head_dim=32)
    ours = LLM(str(tmp_path), kv_cache_memory="16MiB", quantization="int4")
    assert getattr(ours.engine.runner.backend, "step", None) is None
    out = ours.generate(["hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


# HF name (under model.layers.{i}.) -> llama.cpp's GGUF name (under blk.{i}.)
_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip


def test_qwen3_gguf_logits_match_transformers(tmp_path, llm, gguf_path):
    """A Qwen3 GGUF (architecture `qwen3`: q/k norms from the architecture, its tensor names),
    written from a tiny random transformers model with the default model's vocabulary."""
    import gguf

    from slimserve.loader.gguf_file import copy_vocabulary

    ref = make_hf_dir(tmp_path, llm, "qwen3", tie_word_embeddings=True, head_dim=32)
    cfg = ref.config
    w = gguf.GGUFWriter(str(tmp_path / "qwen3.gguf"), "qwen3")
    for key, value in (("context_length", 512), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_hidden_layers),
                       ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads),
                       ("attention.key_length", 32), ("attention.value_length", 32)):  # fmt: skip
        w.add_uint32(f"qwen3.{key}", value)
    w.add_float32("qwen3.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32("qwen3.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    copy_vocabulary(w, gguf_path)  # the default model's byte-level BPE vocabulary
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            w.add_tensor(f"blk.{i}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = LLM(str(tmp_path / "qwen3.gguf"), kv_cache_memory="16MiB", kv_cache_dtype="float32")
    assert ours.engine.model_config.qk_norm and ours.engine.model_config.head_dim == 32
    ids = torch.randint(3, VOCAB, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours.engine.prompt_logits(ids), want, atol=1e-4, rtol=1e-4)
