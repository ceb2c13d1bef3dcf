"""The native attention, KV-write, norm, RoPE and SiLU kernels against their PyTorch paths."""

import pytest
import torch
import torch.nn.functional as F

from slimserve import kernels
from slimserve.backends.kv_format import decode as _decode
from slimserve.backends.kv_format import encode as _encode

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="no C compiler: the PyTorch path runs"
)


def _reference(q, k_cache, v_cache, tables, lens, block_size, scale, begins=None):
    """Gather each sequence's slots, decode int8 rows, run SDPA; also the log-sum-exp."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        n = int(lens[b])
        first = int(begins[b]) if begins is not None else 0
        blocks = tables[b].repeat_interleave(block_size)
        slots = (blocks * block_size + torch.arange(block_size).repeat(tables.shape[1]))[first:n]
        k, v = k_cache[:, slots], v_cache[:, slots]
        if k_cache.dtype == torch.int8:
            k, v = _decode(k), _decode(v)
        k, v = k.float(), v.float()
        outs.append(F.scaled_dot_product_attention(q[b], k, v, scale=scale))
        lses.append(((q[b] @ k.transpose(-1, -2)) * scale).logsumexp(-1))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
# D = 20 takes the portable loops; the others the vector path (when the CPU has AVX2), G = 6
# two groups of four query rows.
@pytest.mark.parametrize("block_size,G,D", [(16, 3, 64), (64, 1, 32), (8, 6, 128), (16, 2, 20)])
def test_paged_decode_matches_sdpa(dtype, block_size, G, D):
    torch.manual_seed(0)
    Hkv, num_blocks = 2, 96
    k_cache = _encode(torch.randn(Hkv, num_blocks * block_size, D), dtype).contiguous()
    v_cache = _encode(torch.randn(Hkv, num_blocks * block_size, D), dtype).contiguous()
    # Lengths of 1 token, within a block, across chunks and blocks; then sequences cut into
    # partitions of 256 tokens (two, one of a single token, three with a short last one).
    lens = torch.tensor([1, block_size - 1, block_size + 1, 33, 5 * block_size, 512, 257, 700])
    max_blocks = -(-700 // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in lens])
    q = torch.randn(len(lens), Hkv, G, D)

    out, lse = kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, block_size, D**-0.5, with_lse=True
    )
    ref_out, ref_lse = _reference(q, k_cache, v_cache, tables, lens, block_size, D**-0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)
    no_lse, none = kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, block_size, D**-0.5
    )
    assert none is None and torch.equal(no_lse, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
# (start, rows): a fresh prompt, rows crossing the 256-token partition, a long context; D = 20
# the portable loops, G = 5 tiles of six positions.
@pytest.mark.parametrize("G,D,start,n", [(3, 64, 0, 45), (3, 64, 240, 40), (4, 128, 500, 30),
                                         (5, 64, 3, 20), (2, 20, 30, 19)])  # fmt: skip
def test_rows_of_one_prompt_tiled_equal_each_row_alone(dtype, G, D, start, n):
    """Consecutive rows of one sequence share a tile (each key chunk read once for all of
    them); every row's bits must be what it gets alone, which batch invariance rests on."""
    torch.manual_seed(1)
    Hkv, bs = 2, 16
    L = start + n
    nblk = -(-L // bs)
    k_cache = _encode(torch.randn(Hkv, (nblk + 1) * bs, D), dtype).contiguous()
    v_cache = _encode(torch.randn(Hkv, (nblk + 1) * bs, D), dtype).contiguous()
    tables = (torch.randperm(nblk) + 1).repeat(n, 1)
    lens = torch.arange(start + 1, L + 1)
    q = torch.randn(n, Hkv, G, D)
    out, lse = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, bs, 0.125, True)
    for i in range(n):
        o1, l1 = kernels.paged_decode_attention(
            q[i : i + 1], k_cache, v_cache, tables[i : i + 1], lens[i : i + 1], bs, 0.125, True
        )
        assert torch.equal(o1[0], out[i]) and torch.equal(l1[0], lse[i]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("G,D", [(4, 256), (2, 20)])
def test_paged_attention_from_a_window_start(dtype, G, D):
    """Rows attending to [begin, len) (sliding windows): against SDPA over those tokens, with the
    table's entries before each window's first block pointing at NaN blocks (given back), and
    consecutive rows of one sequence (a prompt chunk past the window) equal to each row alone."""
    torch.manual_seed(2)
    Hkv, bs, nblk = 1, 16, 48
    k_cache = _encode(torch.randn(Hkv, (nblk + 1) * bs, D), dtype).contiguous()
    v_cache = _encode(torch.randn(Hkv, (nblk + 1) * bs, D), dtype).contiguous()
    if dtype != torch.int8:  # block 0, the null block: reading it would show
        k_cache[:, :bs], v_cache[:, :bs] = float("nan"), float("nan")
    window = 100
    lens = torch.tensor([1, 90, 101, 150, 300, 600, 601, 602, 603])
    begins = (lens - window).clamp(min=0)
    tables = torch.stack([torch.randperm(nblk) + 1 for _ in lens])[:, :38]
    for b in range(len(lens)):  # blocks wholly before the window: the null block
        tables[b, : int(begins[b]) // bs] = 0
    q = torch.randn(len(lens), Hkv, G, D)
    out, lse = kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, bs, D**-0.5, True, begins
    )
    ref_out, ref_lse = _reference(q, k_cache, v_cache, tables, lens, bs, D**-0.5, begins)
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)
    # rows 5..8 are consecutive positions of one sequence: give them one table
    tables[5:] = tables[5]
    out, lse = kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, bs, D**-0.5, True, begins
    )
    for i in range(5, 9):
        o1, l1 = kernels.paged_decode_attention(
            q[i : i + 1], k_cache, v_cache, tables[i : i + 1], lens[i : i + 1], bs, D**-0.5,
            True, begins[i : i + 1],
        )  # fmt: skip
        assert torch.equal(o1[0], out[i]) and torch.equal(l1[0], lse[i]), i


def test_paged_decode_reads_only_its_blocks():
    """Slots outside a sequence's table (or past its length) hold NaN; none may leak in."""
    Hkv, G, D, bs = 1, 2, 16, 4
    k_cache = torch.full((Hkv, 8 * bs, D), float("nan"))
    v_cache = torch.full((Hkv, 8 * bs, D), float("nan"))
    tables = torch.tensor([[5, 2]])
    for blk in (5, 2):
        k_cache[:, blk * bs : (blk + 1) * bs] = torch.randn(Hkv, bs, D)
        v_cache[:, blk * bs : (blk + 1) * bs] = torch.randn(Hkv, bs, D)
    k_cache[:, 2 * bs + 3] = float("nan")  # the 8th token: past the length of 7
    out, _ = kernels.paged_decode_attention(
        torch.randn(1, Hkv, G, D), k_cache, v_cache, tables, torch.tensor([7]), bs, 0.25
    )
    assert torch.isfinite(out).all()


def test_unsupported_shape_is_an_error():
    q = torch.randn(1, 1, 2, 512)  # head_dim beyond the kernel's buffers
    cache = torch.zeros(1, 16, 512)
    with pytest.raises(ValueError, match="unsupported shape"):
        kernels.paged_decode_attention(
            q, cache, cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), 16, 1.0
        )


def test_failed_build_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path))
    with caplog.at_level("WARNING", logger="slimserve"):
        assert not kernels.available()
    assert "using the PyTorch paths" in caplog.text
    assert not list((tmp_path / "kernels").glob("*"))  # no half-built file left behind


@pytest.mark.parametrize("T", [1, 3, 40])  # 40 rows take the threaded loop
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_pytorch(T, with_residual):
    torch.manual_seed(T)
    x, w = torch.randn(T, 576) * 3, torch.rand(576) + 0.5
    residual = torch.randn(T, 576) if with_residual else None
    y, h = kernels.add_rms_norm(x, residual, w, 1e-5)
    ref_h = x + residual if with_residual else x
    torch.testing.assert_close(h, ref_h, atol=0, rtol=0)
    torch.testing.assert_close(y, F.rms_norm(ref_h, (576,), w, 1e-5), atol=1e-5, rtol=1e-5)


def test_add_rms_norm_reads_non_contiguous_inputs():
    base = torch.randn(4, 2 * 64)
    x, residual = base[:, :64], base[:, 64:]  # row stride 128: copied before the call
    y, h = kernels.add_rms_norm(x, residual, torch.ones(64), 1e-6)
    torch.testing.assert_close(h, x + residual)
    torch.testing.assert_close(y, F.rms_norm(x + residual, (64,), torch.ones(64), 1e-6))


@pytest.mark.parametrize("T", [1, 5, 40])  # 40 rows take the threaded loop
def test_rope_is_bit_exact_with_the_pytorch_rotation(T):
    """In place on the q and k heads of a packed projection (rows wider than the heads)."""
    from slimserve.layers.rotary import RotaryEmbedding

    torch.manual_seed(T)
    rotary, H, Hkv, D = RotaryEmbedding(64, 512, 10000.0), 6, 2, 64
    qkv = torch.randn(T, (H + 2 * Hkv) * D) * 3
    positions = torch.randint(0, 512, (T,))
    qk = qkv[:, : (H + Hkv) * D].view(T, H + Hkv, D)
    cos, sin = rotary.cos[positions].unsqueeze(1), rotary.sin[positions].unsqueeze(1)
    ref = qk * cos + rotary._rotate_half(qk) * sin
    v_before = qkv[:, (H + Hkv) * D :].clone()
    out = kernels.rope_(qk, positions, rotary.cos, rotary.sin)
    assert out.data_ptr() == qkv.data_ptr()
    assert torch.equal(out, ref)
    assert torch.equal(qkv[:, (H + Hkv) * D :], v_before)  # values untouched


@pytest.mark.parametrize("T,width", [(1, 1536), (3, 20), (40, 64)])  # 20: the scalar tail
def test_silu_mul_matches_pytorch(T, width):
    torch.manual_seed(width)
    x = torch.randn(T, 2 * width) * 6
    x[0, :4] = torch.tensor([0.0, -0.0, 90.0, -90.0])  # exp's edges: no inf, no NaN
    ref = F.silu(x[:, :width]) * x[:, width:]
    torch.testing.assert_close(kernels.silu_mul(x), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_write_kv_is_bit_exact_with_the_pytorch_encoding(dtype):
    """Keys and values taken as strided views of a packed projection, as the model passes them."""
    torch.manual_seed(1)
    T, H, Hkv, D, slots = 5, 6, 2, 64, 40
    qkv = torch.randn(T, (H + 2 * Hkv) * D) * 4
    qkv[0, H * D : (H + 1) * D] = 0  # an all-zero row: the int8 scale floor
    k = qkv[:, H * D : (H + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (H + Hkv) * D :].view(T, Hkv, D)
    width = D + 4 if dtype == torch.int8 else D
    k_cache, v_cache = (
        torch.zeros(Hkv, slots, width, dtype=dtype),
        torch.zeros(Hkv, slots, width, dtype=dtype),
    )
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    slot_mapping = torch.tensor([3, 17, 4, 39, 0])
    kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)
    ref_k.index_copy_(1, slot_mapping, _encode(k, dtype).transpose(0, 1))
    ref_v.index_copy_(1, slot_mapping, _encode(v, dtype).transpose(0, 1))
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v.view(torch.uint8))


def test_decode_kernel_limits_match_the_c_buffers():
    """The runner asks `decode_attention_supports` before it builds a native decode group; the
    limits must be the C kernel's (a larger shape is refused there, mid-step)."""
    assert kernels.decode_attention_supports(kernels.MAX_QUERY_GROUP, kernels.MAX_HEAD_DIM)
    assert not kernels.decode_attention_supports(kernels.MAX_QUERY_GROUP + 1, 64)
    assert not kernels.decode_attention_supports(1, kernels.MAX_HEAD_DIM + 8)
    q = torch.randn(1, 1, kernels.MAX_QUERY_GROUP, kernels.MAX_HEAD_DIM)
    cache = torch.randn(1, 16, kernels.MAX_HEAD_DIM)
    out, _ = kernels.paged_decode_attention(
        q, cache, cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([16]), 16, 0.1
    )
    assert torch.isfinite(out).all()


def test_cut_overs_are_tuned_per_cpu_maker():
    from slimserve.kernels.build import FLAGS, _vendor, tuning_flags

    amd = tuning_flags("AuthenticAMD")
    assert amd[:2] == ["-DZMIN=3", "-DZMIN8=6"] and "-DZFETCH=8192" in amd
    assert tuning_flags("GenuineIntel") == [] and tuning_flags("") == []
    assert all(f in FLAGS for f in tuning_flags(_vendor()))


def test_bench_cutover_suggests_where_the_tiles_win_from_then_on():
    from slimserve.bench.cutover import suggested

    figures = [(2, 0.8, 0.5), (3, 1.1, 0.6), (4, 0.9, 0.7), (6, 1.2, 0.9), (8, 1.3, 0.95)]
    rows = [{"rows": r, "int4_ratio": q, "head_ratio": h} for r, q, h in figures]
    assert suggested(rows, "int4") == 6  # 3 won, but 4 did not
    assert suggested(rows, "head") is None
