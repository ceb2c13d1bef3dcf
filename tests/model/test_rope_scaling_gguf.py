"""RoPE scaling carried by GGUF files: Llama 3.x's `rope_freqs.weight` factors and linear
scaling in the metadata, against transformers' own scaled rotary embedding."""

import copy
import functools

import gguf
import numpy as np
import pytest
import torch

from slimserve import LLM
from slimserve.errors import UnsupportedModel

from .test_parity import PROMPTS, hf_logits


def copy_gguf(
    src: str, dst: str, extra_meta: dict | None = None, extra_tensors: dict | None = None
):
    """`src` rewritten with more metadata and tensors (everything else as it was)."""
    reader = _reader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, (value, vtype) in (extra_meta or {}).items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@functools.cache
def _reader(path: str):
    return gguf.GGUFReader(path)  # ~3 s for the default model's header: read it once


def scaled_hf(hf_model, rope_parameters: dict):
    """A copy of transformers' model whose rotary embedding uses `rope_parameters`."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = copy.deepcopy(hf_model)
    cfg = model.config
    cfg.rope_parameters = {"rope_theta": cfg.rope_parameters["rope_theta"], **rope_parameters}
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)
    return model


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}  # fmt: skip


def test_rope_freqs_factors_match_transformers_llama3(
    tmp_path, gguf_path, hf_model, hf_tokenizer, llm
):
    # The factors a converter writes for Llama 3.x scaling: unscaled over scaled frequencies,
    # taken from transformers' llama3 rotary embedding.
    ref_model = scaled_hf(hf_model, LLAMA3)
    plain_inv = hf_model.model.rotary_emb.inv_freq
    factors = (plain_inv / ref_model.model.rotary_emb.inv_freq).numpy().astype(np.float32)
    assert (factors > 1.5).sum() >= 4 and (factors == 1).sum() >= 4  # scaled and kept ones
    path = str(tmp_path / "llama3-scaled.gguf")
    copy_gguf(gguf_path, path, extra_tensors={"rope_freqs.weight": factors})
    ours = LLM(path, kv_cache_memory="64MiB", quantization="none", kv_cache_dtype="float32")
    ids = hf_tokenizer(PROMPTS[1] + PROMPTS[0] * 5, add_special_tokens=False).input_ids
    got, ref = ours.engine.prompt_logits(ids), hf_logits(ref_model, ids)
    unscaled = llm.engine.prompt_logits(ids)
    assert (unscaled - ref).abs().max() > 0.5  # the scaling changes the logits a lot
    assert (got - ref).abs().max() < 2e-3
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_linear_scaling_in_metadata(tmp_path, gguf_path, hf_model, hf_tokenizer):
    meta = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
            "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}  # fmt: skip
    path = str(tmp_path / "linear.gguf")
    copy_gguf(gguf_path, path, extra_meta=meta)
    ours = LLM(path, kv_cache_memory="64MiB", quantization="none", kv_cache_dtype="float32")
    ref_model = scaled_hf(hf_model, {"rope_type": "linear", "factor": 4.0})
    ids = hf_tokenizer(PROMPTS[2] * 4, add_special_tokens=False).input_ids
    assert (ours.engine.prompt_logits(ids) - hf_logits(ref_model, ids)).abs().max() < 2e-3


def test_rope_scaling_we_do_not_implement_is_refused(tmp_path, gguf_path):
    path = str(tmp_path / "yarn.gguf")
    copy_gguf(gguf_path, path, extra_meta={
        "llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)})  # fmt: skip
    with pytest.raises(UnsupportedModel, match="yarn"):
        LLM(path, kv_cache_memory="64MiB")
    bad = str(tmp_path / "short-freqs.gguf")
    copy_gguf(gguf_path, bad, extra_tensors={"rope_freqs.weight": np.ones(5, np.float32)})
    with pytest.raises(Exception, match="rope_freqs.weight must hold 32"):
        LLM(bad, kv_cache_memory="64MiB")
