"""Hugging Face safetensors directories: tiny random Llama/Qwen2 models against transformers."""

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
    if arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
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
}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_directory_logits_match_transformers(tmp_path, llm, case):
    arch, overrides = CASES[case]
    ref_model = make_hf_dir(tmp_path, llm, arch, **overrides)
    ours = LLM(
        str(tmp_path), kv_cache_memory="16MiB", max_num_batched_tokens=64, kv_cache_dtype="float32"
    )
    if arch == "qwen2":
        assert ours.engine.model_config.attention_bias
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
