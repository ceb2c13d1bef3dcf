"""Rotary position embedding (NeoX / HF `rotate_half` layout), with a precomputed cos/sin table."""

import math

import torch
from torch import nn

from slimserve import kernels


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1 long-context scaling: long wavelengths slowed by `factor`, short ones kept,
    # a smooth blend in between.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, blended, out)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables cover the first INITIAL_POSITIONS positions and double as a step
    reaches past them (`cover`), up to max_position: a 32k-context model with 256-wide heads
    would otherwise hold 67 MB of tables per RoPE base from the start. A position's row is the
    same bits whatever the table's length."""

    NATIVE = ("rope",)
    INITIAL_POSITIONS = 4096

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.native = kernels.chosen(self.NATIVE)  # settled again at build: kernels.select
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "freq_factors":  # llama.cpp's rope_freqs: each frequency divided by its own
            factors = torch.tensor(scaling["factors"], dtype=torch.float32)
            if factors.shape != inv_freq.shape:
                raise ValueError(f"{len(factors)} rope frequency factors for head_dim {head_dim}")
            inv_freq = inv_freq / factors
        elif kind is not None:
            raise NotImplementedError(f"rope scaling {kind!r}")
        self.max_position = max_position
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(min(max_position, self.INITIAL_POSITIONS))

    def _build(self, n: int) -> None:
        freqs = torch.outer(
            torch.arange(n, dtype=torch.float32, device=self.inv_freq.device), self.inv_freq
        )
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
        self.cos, self.sin = emb.cos(), emb.sin()

    def cover(self, positions: torch.Tensor) -> None:
        """Grow the tables (doubling, at most to max_position) to hold every row of
        `positions`; a position past max_position is left to fail where it is read."""
        if not positions.numel():
            return
        top = int(positions.max())
        n = self.cos.shape[0]
        if n <= top < self.max_position:
            self._build(min(self.max_position, max(top + 1, 2 * n)))

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def table(self, positions: torch.Tensor):
        """(cos, sin, positions) for the step: cos and sin (T, 1, D) rows of the tables, or None
        where the native kernel rotates from the tables themselves."""
        self.cover(positions)
        if self._native(self.cos):
            return None, None, positions
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1), positions

    def _native(self, t: torch.Tensor) -> bool:
        return bool(self.native) and t.dtype == torch.float32 and t.device.type == "cpu"

    def rotate(self, rope, x: torch.Tensor) -> torch.Tensor:
        """x: (T, heads, D) -> x rotated by its token's position; rope from `table`. The native
        kernel rotates x in place (a view of a fresh projection)."""
        cos, sin, positions = rope
        heads_packed = x.stride(2) == 1 and x.stride(1) == x.shape[2]
        if cos is None and x.dtype == torch.float32 and heads_packed:
            return kernels.rope_(x, positions, self.cos, self.sin)
        if cos is None:
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return x * cos + self._rotate_half(x) * sin
