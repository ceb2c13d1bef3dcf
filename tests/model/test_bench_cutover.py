"""`slimserve bench cutover` on the default model: both builds timed at each row count, and the
same bits from both on the model's own weights (the cut-over may move only speed)."""

import pytest
import torch

from slimserve import LLM, kernels
from slimserve.bench.cutover import NARROW, WIDE, cutover
from slimserve.kernels.peaks import matmul_path
from slimserve.quant.int4 import Int4Linear


def test_cutover_times_both_builds_which_give_the_same_bits(gguf_path):
    if matmul_path() != "vnni512":
        pytest.skip("no 512-bit tiles on this CPU")
    model = LLM(gguf_path, kv_cache_memory="64MiB").engine.model
    (row,) = cutover(model, [3], rounds=1)
    assert row["rows"] == 3
    for w in ("int4", "head"):
        assert row[f"{w}_256_ms"] > 0 and row[f"{w}_512_ms"] > 0 and row[f"{w}_ratio"] > 0
    narrow, wide = kernels.load_variant(NARROW), kernels.load_variant(WIDE)
    lin = next(m for m in model.modules() if isinstance(m, Int4Linear))
    x = torch.randn(5, lin.in_features)
    args = (lin.packed, lin.scales_zeros, lin.group, lin.doubled, lin.out_features, lin.bias)
    a = kernels.int4_matmul(x, *args, narrow, eight_bit=lin.eight_bit)
    b = kernels.int4_matmul(x, *args, wide, eight_bit=lin.eight_bit)
    assert torch.equal(a, b)
