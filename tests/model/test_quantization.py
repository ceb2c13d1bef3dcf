"""int8 weight-only linears against the fp32 model they replace."""

import pytest
import torch

from slimserve import LLM, SamplingParams
from slimserve.errors import InvalidRequest
from slimserve.quant.int8 import Int8Linear, _quantize_rows

from .test_parity import LONG_TEXT


@pytest.fixture(scope="module")
def int8_llm(gguf_path):
    return LLM(gguf_path, kv_cache_memory="128MiB", quantization="int8")


def test_int8_linear_against_dequantized_reference():
    from slimserve.layers.linear import Linear

    lin = Linear(64, [48, 16])
    lin.weight.data = torch.randn(64, 64)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    qw, s = _quantize_rows(lin.weight.t())
    ref = x.to(torch.bfloat16).float() @ (qw.float() * s.float().unsqueeze(1)).t()
    assert torch.allclose(q(x), ref, rtol=2e-2, atol=2e-2)  # bf16 output rounding
    rel = (q(x) - x @ lin.weight).norm() / (x @ lin.weight).norm()
    assert rel < 0.02  # int8 rounding of the weights themselves


def test_int8_model_tracks_fp32_logits(llm, int8_llm):
    ids = llm.tokenizer.encode(LONG_TEXT * 8, add_special_tokens=False)[:2000]
    ref = llm.engine.runner.prompt_logits(ids)
    got = int8_llm.engine.runner.prompt_logits(ids)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.97
    assert not any(isinstance(m, torch.nn.Linear) for m in int8_llm.engine.model.modules())


def test_int8_greedy_answer(int8_llm):
    out = int8_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=16, temperature=0.0),
    )[0].outputs[0]
    assert "Paris" in out.text


def test_unknown_quantization_is_refused(gguf_path):
    with pytest.raises(InvalidRequest, match="unknown quantization 'int3'"):
        LLM(gguf_path, quantization="int3")
