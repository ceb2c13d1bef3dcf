"""The native decode step (backends/native_step.py) against the model's modules.

Both paths call the same kernels in the same order, so a step's logits must be identical bit for
bit, whatever the KV cache's format, the batch, and the sequences' lengths."""

import pytest
import torch

from slimserve import LLM, SamplingParams, kernels

from ..unit.test_hf_models import make_hf_dir
from .test_parity import LONG_TEXT

pytestmark = pytest.mark.skipif(
    not kernels.available("decode_step"), reason="native kernels unavailable"
)

PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France? Answer in one sentence, then explain why in detail.",
    "1, 2, 3,",
    LONG_TEXT * 6,  # ~320 tokens: attention cuts it into partitions of 256
]


def _logits_of(llm: LLM, prompts, native: bool, max_tokens: int = 24):
    """Every step's logits and the outputs, with the native step on or off."""
    model, logits = llm.engine.runner.model, []
    compute = model.compute_logits

    def record(hidden):
        logits.append(compute(hidden))
        return logits[-1]

    kernels.set_enabled(native, "decode_step")
    llm.engine.use_kernels(True)  # kernels are chosen at build: rebuild with the switch
    model.compute_logits = record
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params)
    finally:
        del model.compute_logits
        kernels.set_enabled(True, "decode_step")
        llm.engine.use_kernels(True)
    return logits, [o.outputs[0].token_ids for o in outs]


def _assert_same_steps(llm: LLM, prompts):
    step = llm.engine.runner.native_step
    assert step is not None
    before = step.steps
    native, native_tokens = _logits_of(llm, prompts, True)
    assert step.steps - before >= 20  # the decode steps ran natively
    after = step.steps
    modules, module_tokens = _logits_of(llm, prompts, False)
    assert step.steps == after  # ... and were off for the reference run
    assert native_tokens == module_tokens
    assert len(native) == len(modules)
    for a, b in zip(native, modules):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float32", "int8"])
def test_native_step_matches_the_modules_bit_for_bit(gguf_path, kv_dtype):
    llm = LLM(gguf_path, kv_cache_memory="64MiB", kv_cache_dtype=kv_dtype,
              enable_prefix_caching=False)  # fmt: skip
    _assert_same_steps(llm, PROMPTS)  # a batch of 4 of different lengths
    _assert_same_steps(llm, PROMPTS[3:])  # batch 1, long


def test_native_step_with_qkv_bias_and_a_non_default_shape(tmp_path, llm):
    """A tiny int4 Qwen2 (q/k/v bias, head_dim 16, two query heads per KV head)."""
    make_hf_dir(tmp_path, llm, "qwen2", tie_word_embeddings=True)
    tiny = LLM(str(tmp_path), kv_cache_memory="16MiB", quantization="int4",
               enable_prefix_caching=False)  # fmt: skip
    assert tiny.engine.model_config.attention_bias
    _assert_same_steps(tiny, PROMPTS)


def test_float_weights_keep_the_modules(llm):
    """The session's reference engine has float32 weights: the native step does not take it."""
    assert llm.engine.runner.native_step is None


def test_rope_tables_grow_under_the_native_step(gguf_path):
    """RoPE tables start short and double when a step reaches past them; the native step's
    struct then points at the new tables. Shrunk to 64 positions, a request decoding from 100
    to 160 grows them twice (in the prefill's modules, then in native steps) and gives the same
    tokens as with the tables at their first size."""
    from slimserve.layers.rotary import RotaryEmbedding

    llm = LLM(gguf_path, kv_cache_memory="32MiB")
    assert llm.engine.runner.native_step is not None
    (rotary,) = [m for m in llm.engine.model.modules() if isinstance(m, RotaryEmbedding)]
    ids = llm.tokenizer.encode(LONG_TEXT * 3)[:100]
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    want = llm.generate([ids], params)[0].outputs[0].token_ids
    full = rotary.cos[:160].clone()
    step = llm.engine.runner.native_step
    rotary._build(64)  # as if the model and its native step were built with 64 positions
    step._tables = (rotary.cos, rotary.sin)
    step.model.cos, step.model.sin = rotary.cos.data_ptr(), rotary.sin.data_ptr()
    steps = step.steps
    assert llm.generate([ids], params)[0].outputs[0].token_ids == want
    assert llm.engine.runner.native_step.steps > steps and rotary.cos.shape[0] == 256
    assert torch.equal(rotary.cos[:160], full)
