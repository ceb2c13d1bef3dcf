"""The int4 and int8 matmul kernels against x8 @ dequantize(W).T, on the native build (512-bit
VNNI tiles where the CPU has AVX-512 VNNI and VBMI), on a build held to 256-bit VNNI, and on
builds without VNNI (the AVX2 paths)."""

import platform

import pytest
import torch

from slimserve import kernels

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="no C compiler: the PyTorch path runs"
)


def _int4_linear(N, K, group, eight_bit, bias=False):
    """eight_bit: False (4-bit), True (8-bit as two 4-bit halves) or "mixed" (a 4-bit shard and
    an 8-bit one in one doubled matrix, as q/k/v of different GGUF types)."""
    from slimserve.quant.int4 import (
        Int4Linear,
        int4_as_doubled,
        int8_as_int4,
        quantize_int4,
        quantize_int8,
    )

    w = torch.randn(N, K)
    if eight_bit == "mixed":
        parts = [
            int4_as_doubled(*quantize_int4(w[: N // 2], group)),
            int8_as_int4(*quantize_int8(w[N // 2 :])),
        ]
        codes, scale, zero = (torch.cat(t) for t in zip(*parts))
    elif eight_bit:
        codes, scale, zero = int8_as_int4(*quantize_int8(w))
    else:
        codes, scale, zero = quantize_int4(w, group)
    b = torch.randn(N) if bias else None
    return Int4Linear(codes, scale, zero, in_features=K, output_sizes=[N], bias=b)


def _int8_rows(x):
    """x rounded as the kernel rounds activations: int8 per 32 inputs, scale amax / 127."""
    g = x.reshape(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / 127)).view_as(x)


# The native build, one held to 256-bit registers, and one without VNNI for the AVX2 path.
VARIANTS = {"native": [], "vnni256": ["-DNO_ZMM"], "avx2": ["-mno-avx512vnni", "-mno-avxvnni"]}


def _variant(flags):
    """A build with extra flags, or a skip where this compiler or CPU takes no such flags
    (not x86, or a gcc older than 11 for -mno-avxvnni)."""
    if not flags:
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 build variants")
    try:
        return kernels.load_variant(flags)
    except (OSError, RuntimeError) as e:
        pytest.skip(f"this compiler cannot build the variant: {e}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "N,K,group,eight_bit,bias,M",
    [
        (960, 576, 32, False, False, 1),
        (192, 576, 32, False, True, 3),
        (128, 512, 128, False, False, 17),  # passes of 4 rows and a remainder; groups of 128
        (100, 256, 32, True, True, 2),  # 8-bit as doubled K; 100 rows padded to 128
        (192, 256, 32, True, False, 5),  # 8-bit, read as one byte per weight with VNNI
        (192, 256, 32, "mixed", False, 3),  # 4- and 8-bit shards: two 4-bit halves
        (320, 576, 32, False, True, 70),  # 512-bit tiles: a pass of 64 rows and one of 6
        (192, 512, 64, True, False, 9),  # ... 8-bit as one byte, groups of 64
        (576, 576, 32, False, True, 8),  # 9 tiles at 8 rows: the last one cut by rows
    ],
)
def test_int4_matmul_matches_dequantized_weights(N, K, group, eight_bit, bias, M, variant):
    """The kernel computes x8 @ dequantize(W).T exactly up to float summation order, where x8 is
    x rounded to int8 per block of 32."""
    torch.manual_seed(0)
    lib = _variant(VARIANTS[variant])
    lin = _int4_linear(N, K, group, eight_bit, bias)
    wide = torch.randn(M, K + 64)
    x = wide[:, 16 : 16 + K]  # rows K + 64 apart: read in place
    x[0, :32] = 0  # an all-zero block has scale 0, not NaN
    assert lin.eight_bit == (eight_bit is True)
    y = kernels.int4_matmul(
        x,
        lin.packed,
        lin.scales_zeros,
        lin.group,
        lin.doubled,
        lin.out_features,
        lin.bias,
        lib,
        eight_bit=lin.eight_bit,
    )
    if y is None:
        pytest.skip("the int4 kernel needs AVX2")
    ref = _int8_rows(x) @ lin.rows(torch.arange(N)).t()
    if bias:
        ref = ref + lin.bias
    assert y.shape == (M, N)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # Against the float activations the gap is the int8 rounding: well under 1%.
    exact = x @ lin.rows(torch.arange(N)).t() + (lin.bias if bias else 0)
    assert (y - exact).norm() / exact.norm() < 1e-2


def test_int4_matmul_rows_do_not_depend_on_the_batch():
    """A row's output is bit-identical alone or batched: serving results don't depend on who
    else is in the step."""
    torch.manual_seed(1)
    # 5 and 9 tiles at 9 and 8 rows: the odd tile is cut by rows over the threads
    for N, M in ((320, 9), (576, 8)):
        lin = _int4_linear(N, 576, 32, False)
        x = torch.randn(M, 576)
        args = (lin.packed, lin.scales_zeros, lin.group, lin.doubled, lin.out_features)
        batched = kernels.int4_matmul(x, *args)
        if batched is None:
            pytest.skip("the int4 kernel needs AVX2")
        for i in (0, 4, M - 1):
            assert torch.equal(kernels.int4_matmul(x[i : i + 1], *args), batched[i : i + 1])


def test_wide_and_narrow_paths_give_the_same_bits():
    """The 512-bit tiles (from ZMIN rows up) and the 256-bit path compute the same float steps per
    output over exact integer sums: equal bits, so a row is the same batched (wide tiles) or alone
    (narrow), and the same on a CPU with or without AVX-512."""
    from slimserve.quant.int4 import quantize_int8
    from slimserve.quant.int8 import Int8Linear

    torch.manual_seed(3)
    narrow = _variant(VARIANTS["vnni256"])
    x = torch.randn(37, 576)
    for eight_bit in (False, True):
        lin = _int4_linear(320, 576, 32, eight_bit, bias=True)
        args = (lin.packed, lin.scales_zeros, lin.group, lin.doubled, lin.out_features, lin.bias)
        wide = kernels.int4_matmul(x, *args, eight_bit=lin.eight_bit)
        if wide is None:
            pytest.skip("the int4 kernel needs AVX2")
        assert torch.equal(wide, kernels.int4_matmul(x, *args, narrow, eight_bit=lin.eight_bit))
        for i in (0, 36):
            alone = kernels.int4_matmul(x[i : i + 1], *args, eight_bit=lin.eight_bit)
            assert torch.equal(alone, wide[i : i + 1])
    if kernels.int8_built():
        q, d = quantize_int8(torch.randn(256, 576))
        lin8 = Int8Linear(q, d, in_features=576, output_sizes=[256], bias=torch.randn(256))
        args8 = (lin8.codes, lin8.scales, lin8.out_features, lin8.bias)
        wide = kernels.int8_matmul(x, *args8)
        assert torch.equal(wide, kernels.int8_matmul(x, *args8, narrow))
        assert torch.equal(kernels.int8_matmul(x[5:6], *args8), wide[5:6])


def test_int4_linear_uses_the_kernel_unless_turned_off():
    torch.manual_seed(2)
    lin = _int4_linear(128, 256, 32, False)
    x = torch.randn(4, 256)
    args = (lin.packed, lin.scales_zeros, lin.group, lin.doubled, lin.out_features)
    if not kernels.available() or kernels.int4_matmul(x, *args) is None:
        pytest.skip("the int4 kernel needs AVX2: both calls would run PyTorch")
    native = lin(x)
    with kernels.without(lin, "int4_matmul"):
        pytorch = lin(x)
    assert not torch.equal(native, pytorch)  # int8 vs bf16 activations: close, not equal
    torch.testing.assert_close(native, pytorch, rtol=0, atol=2e-2 * pytorch.abs().max().item())
    with pytest.raises(ValueError, match="unknown kernel"):
        kernels.set_enabled(False, "no_such_kernel")


def test_bench_kernels_int4_rows():
    """`slimserve bench kernels` measures the int4 kernel, its AVX2 path and PyTorch's on each of
    the default model's layer shapes."""
    from slimserve.bench.kernels import AVX2_ONLY, INT4_SHAPES, int4_op

    _variant(AVX2_ONLY)  # skips where the AVX2-only copy cannot be built
    rows = int4_op([1], runs=1)
    assert [r["layer"] for r in rows] == list(INT4_SHAPES)
    for r in rows:
        assert min(r["native_gflops"], r["avx2_gflops"], r["pytorch_gflops"]) > 0


# The 8-bit matmul's paths: VNNI with two rows a pass (32 vector registers), the AVX2 sign trick
# with two, and with one (16 registers).
VARIANTS8 = {
    "native": [],
    "vnni256": ["-DNO_ZMM"],
    "avx2": ["-mno-avx512vnni", "-mno-avxvnni"],
    "avx2-16-registers": ["-mno-avx512vnni", "-mno-avxvnni", "-mno-avx512vl"],
}


def _int8_linear(N, K, bias=False):
    from slimserve.quant.int4 import quantize_int8
    from slimserve.quant.int8 import Int8Linear

    q, d = quantize_int8(torch.randn(N, K))
    q[0, :4] = torch.tensor([127, -127, 0, 1], dtype=torch.int8)  # the code range's ends
    b = torch.randn(N) if bias else None
    lin = Int8Linear(q, d, in_features=K, output_sizes=[N], bias=b)
    return lin, q.float() * d.half().float().repeat_interleave(32, dim=1)  # scales are float16


@pytest.mark.parametrize("variant", VARIANTS8)
@pytest.mark.parametrize(
    "N,K,bias,M",
    [
        (200, 576, False, 1),
        (128, 256, True, 5),
        (64, 1536, False, 3),
        (192, 576, False, 32),
        (256, 576, True, 75),  # 512-bit tiles (from 8 rows, 14 on AMD): passes of 64 and 11
    ],
)
def test_int8_matmul_matches_dequantized_weights(N, K, bias, M, variant):
    """x8 @ (q d).T up to float summation order (x8: x rounded to int8 per 32), for both the
    VNNI path and the AVX2 one; 200 rows are padded to 256."""
    torch.manual_seed(2)
    if not kernels.int8_built():
        pytest.skip("the int8 kernel needs AVX2 and F16C")
    lib = _variant(VARIANTS8[variant])
    lin, w = _int8_linear(N, K, bias)
    wide = torch.randn(M, K + 64)
    x = wide[:, 16 : 16 + K]  # rows K + 64 apart: read in place
    x[0, :32] = 0  # an all-zero block
    x[-1, 32:64] = -torch.arange(32.0)  # a block whose amax is negative: code -127
    y = kernels.int8_matmul(x, lin.codes, lin.scales, lin.out_features, lin.bias, lib)
    ref = _int8_rows(x) @ w.t() + (lin.bias if bias else 0)
    assert y.shape == (M, N)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_int8_linear_rows_and_fallback():
    """Embedding rows are q d exactly (native and PyTorch paths alike); with the kernel off, the
    4-bit layout built on first use gives the same products up to bf16 activations."""
    if not kernels.int8_built():
        pytest.skip("the int8 kernel needs AVX2 and F16C")
    torch.manual_seed(3)
    lin, w = _int8_linear(100, 256, bias=True)
    ids = torch.tensor([0, 1, 63, 64, 99])
    assert torch.equal(lin.rows(ids), w[ids])
    x = torch.randn(3, 256)
    native = lin(x)
    with kernels.without(lin, "int8_rows", "int8_matmul"):
        assert torch.equal(lin.rows(ids), w[ids])
        fallback = lin(x)
    assert (fallback - native).norm() / native.norm() < 1e-2


def test_int8_layout_refuses_code_minus_128():
    """The AVX2 sign trick cannot negate -128: such a weight keeps the 4-bit layout."""
    from slimserve.quant.int4 import quantize_int8
    from slimserve.quant.int8 import Int8Linear

    q, d = quantize_int8(torch.randn(64, 64))
    assert Int8Linear.takes(q, d) == kernels.int8_built()
    q[3, 5] = -128
    assert not Int8Linear.takes(q, d)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_matmul_path_follows_the_cpu_and_the_build():
    """The library runs the widest path the CPU it was built on has (it is compiled there with
    -march=native); -DNO_ZMM and -mno-avx512vnni builds step down to 256-bit VNNI and AVX2."""
    flags = _cpu_flags()
    if "avx2" not in flags:
        pytest.skip("x86 with AVX2: the int4/int8 matmul paths")
    has512 = {"avx512_vnni", "avx512vbmi", "avx512bw"} <= flags
    has_vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    expected = "vnni512" if has512 else "vnni256" if has_vnni else "avx2"
    assert kernels.matmul_path() == expected
    if has_vnni:
        assert kernels.matmul_path(_variant(VARIANTS["vnni256"])) == "vnni256"
        assert kernels.matmul_path(_variant(VARIANTS["avx2"])) == "avx2"
    # The peaks bench roofline rates the paths by: measured where the instruction is there.
    assert kernels.peak_macs_per_s("fp32_fma256", 1, runs=1) > 0
    assert (kernels.peak_macs_per_s("int8_vnni512", 1, runs=1) is not None) == has512
