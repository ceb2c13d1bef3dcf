"""The native argmax greedy decoding and the sampler's draw use, against torch.argmax."""

import pytest
import torch

from slimserve import kernels
from slimserve.core.request import Request
from slimserve.engine.sampler import Sampler
from slimserve.kernels.argmax import argmax
from slimserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="no C compiler: the PyTorch path runs"
)


def _hard_rows() -> torch.Tensor:
    """Rows where the first-maximum rule and NaN decide the answer."""
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    x[0, 5] = x[0, 50] = x[0, 99] = 1e9  # a tie: the first wins
    x[1, 3] = x[1, 90] = float("nan")  # NaN counts as the largest: the first NaN
    x[1, 40] = float("inf")
    x[2] = float("-inf")  # every value -inf: index 0
    x[3, 97] = float("inf")  # in the scalar tail past the last 8-wide step
    x[4] = 0.0
    x[4, 0] = -0.0  # -0 == 0: a tie
    x[5] = -0.0
    x[5, 77] = 0.0
    x[6, 99] = float("nan")  # NaN in the tail only
    x[7, 96:] = 5e8  # the maximum in the last full step
    return x


def _native(lib, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.argmax_rows(x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], out.data_ptr(), 2)
    return out


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 49152])
def test_argmax_matches_torch_on_random_rows(n):
    x = torch.randn(13, n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(argmax(x), x.argmax(-1))


def test_argmax_matches_torch_on_ties_nan_infinities_and_signed_zeros():
    x = _hard_rows()
    assert torch.equal(argmax(x), x.argmax(-1))
    assert argmax(x).tolist()[:3] == [5, 3, 0]


def test_argmax_reads_strided_rows_and_falls_back_where_it_cannot():
    big = torch.randn(5, 130)
    view = big[:, 3:120]  # rows 130 apart
    assert torch.equal(argmax(view), view.argmax(-1))
    cols = big.t()[:40]  # values not contiguous: PyTorch's path
    assert torch.equal(argmax(cols), cols.argmax(-1))
    assert torch.equal(argmax(big.double()), big.argmax(-1))
    assert argmax(torch.empty(0, 7)).shape == (0,)


def test_argmax_portable_loop_without_avx2():
    """A build without AVX2 (an older or non-x86 CPU) runs the scalar loop: same answers."""
    from slimserve.kernels.peaks import matmul_path

    lib = kernels.load_variant(["-mno-avx2", "-mno-fma", "-mno-avx512f"])
    assert matmul_path(lib) == "none"  # the whole library builds without AVX2
    x = torch.cat([_hard_rows(), torch.randn(4, 100)])
    assert torch.equal(_native(lib, x), x.argmax(-1))


def test_greedy_sampler_takes_the_native_argmax():
    sampler = Sampler(native_argmax=True)
    x = _hard_rows()[[0, 3, 7]]
    rows = [Request("r", None, [1, 2], SamplingParams(temperature=0.0), frozenset())] * 3
    assert sampler(x, rows).token_ids == [5, 97, 96]
