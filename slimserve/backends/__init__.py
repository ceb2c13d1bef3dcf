"""Attention backends, one chosen when the engine is built.

  torch-sdpa  gathers and PyTorch SDPA: any device, any CPU (backends/torch_sdpa.py)
  native-cpu  the paged C kernel reading blocks in place, the native KV write, and the fused
              decode step (backends/native_cpu.py)

A CUDA backend plugs in beside them: a class with the same four methods (backends/base.py).
"""

from __future__ import annotations

from slimserve import kernels
from slimserve.backends.base import AttentionBackend
from slimserve.config import ModelConfig


def make_backend(cfg: ModelConfig, native: bool) -> AttentionBackend:
    """The native CPU backend when `native` and its kernels take this model's shape, else
    PyTorch's."""
    group = cfg.num_heads // cfg.num_kv_heads
    if (
        native
        and kernels.available("paged_decode_attention")
        and kernels.available("write_kv")
        and kernels.decode_attention_supports(group, cfg.head_dim)
    ):
        from slimserve.backends.native_cpu import NativeCPUBackend

        return NativeCPUBackend(fused_step=kernels.available("decode_step"))
    from slimserve.backends.torch_sdpa import TorchSDPABackend

    return TorchSDPABackend()


__all__ = ["AttentionBackend", "make_backend"]
