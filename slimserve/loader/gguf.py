"""GGUF files, read with the `gguf` package (llama.cpp's own reader and dequantizer)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from slimserve.config import ModelConfig
from slimserve.errors import ModelLoadError, UnsupportedModel
from slimserve.loader.names import IGNORED, PERMUTED_QK, gguf_to_hf
from slimserve.loader.resolve import ModelSource, QuantizedTensor

GGUF_MAGIC = b"GGUF"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order: its converter interleaves each head's two halves."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class GGUFSource(ModelSource):
    def __init__(self, path: str):
        import gguf

        self.path = path
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(
                f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')"
            )
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises whatever numpy/struct raise on bad bytes
            raise ModelLoadError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from e
        self._check_extents()
        self.arch = self.meta("general.architecture")
        if self.arch is None:
            raise ModelLoadError(f"{path} has no general.architecture key")
        self.config = self._read_config()

    def meta(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _check_extents(self):
        size = os.path.getsize(self.path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ModelLoadError(
                    f"{self.path} is truncated: tensor {t.name} needs bytes up to "
                    f"{t.data_offset + t.n_bytes}, file has {size}"
                )

    def _read_config(self) -> ModelConfig:
        from slimserve.models import is_supported

        a = self.arch
        if not is_supported(a):
            raise UnsupportedModel(f"unsupported architecture {a!r} in {self.path}")
        names = {t.name for t in self.reader.tensors}
        heads = self.meta(f"{a}.attention.head_count")
        hidden = self.meta(f"{a}.embedding_length")
        if heads is None or hidden is None:
            raise ModelLoadError(f"{self.path} lacks {a}.attention.head_count/embedding_length")
        vocab = self.meta(f"{a}.vocab_size") or len(
            self.reader.fields["tokenizer.ggml.tokens"].data
        )
        return ModelConfig(
            architecture=a,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(self.meta(f"{a}.feed_forward_length")),
            num_layers=int(self.meta(f"{a}.block_count")),
            num_heads=int(heads),
            num_kv_heads=int(self.meta(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.meta(f"{a}.attention.key_length", hidden // heads)),
            rms_norm_eps=float(self.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.meta(f"{a}.rope.freq_base", 10000.0)),
            max_position=int(self.meta(f"{a}.context_length", 4096)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
        )

    def tensor_types(self) -> set[str]:
        """The storage formats of the file's tensors, e.g. {"F32", "Q4_1", "Q8_0"}."""
        return {t.tensor_type.name for t in self.reader.tensors}

    def weights(
        self, keep: frozenset[str] = frozenset()
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        from gguf.quants import dequantize

        permuted = PERMUTED_QK.get(self.arch, ())
        cfg = self.config
        for t in self.reader.tensors:
            if t.name in IGNORED:
                continue
            hf_name = gguf_to_hf(t.name)
            if hf_name is None:
                raise UnsupportedModel(f"unexpected tensor {t.name} in {self.path}")
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if t.tensor_type.name in keep:
                # Raw blocks, one row of blocks per output feature (numpy shape is reversed).
                rows, cols = int(t.shape[1]), int(t.shape[0])
                raw = np.asarray(t.data).reshape(rows, -1)
                if kind in permuted:
                    raw = _unpermute_rows(
                        raw, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
                    )
                yield (
                    hf_name,
                    QuantizedTensor(
                        t.tensor_type.name,
                        (rows, cols),
                        torch.from_numpy(np.array(raw)),
                    ),
                )
                continue
            try:
                # np.array copies: F32 tensors come back as read-only views of the file mapping.
                w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
            except NotImplementedError as e:
                raise UnsupportedModel(f"{t.name}: tensor type {t.tensor_type.name}: {e}") from e
            if kind in permuted:
                w = _unpermute_rows(w, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
            yield hf_name, torch.from_numpy(np.ascontiguousarray(w))

    def tokenizer(self):
        from slimserve.loader.tokenizer import Tokenizer

        return Tokenizer.from_gguf(self)
