"""GGUF files: the header read by loader/gguf_file.py, block formats other than the ones kept
compressed dequantized by the `gguf` package (llama.cpp's own dequantizer)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from slimserve.config import ModelConfig
from slimserve.errors import ModelLoadError, UnsupportedModel
from slimserve.loader.gguf_file import GGUFFile, GGUFFormatError
from slimserve.loader.names import IGNORED, PERMUTED_QK, ROPE_FREQS, gguf_to_hf
from slimserve.loader.resolve import ModelSource, QuantizedTensor

GGUF_MAGIC = b"GGUF"


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row order: its converter interleaves each head's two halves."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _float_array(raw: np.ndarray, type_name: str) -> np.ndarray | None:
    """A float type's bytes as float32 (None for a block format)."""
    if type_name == "F32":
        return raw.view(np.float32)
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if type_name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return None


class GGUFSource(ModelSource):
    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(
                f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')"
            )
        try:
            self.file = GGUFFile(path)
        except GGUFFormatError as e:
            raise ModelLoadError(f"{path} is truncated or corrupt: {e}") from e
        self._check_extents()
        self.arch = self.meta("general.architecture")
        if self.arch is None:
            raise ModelLoadError(f"{path} has no general.architecture key")
        self.config = self._read_config()

    def meta(self, key: str, default=None):
        return self.file.meta(key, default)

    def _check_extents(self):
        size = self.file.size
        for t in self.file.tensors:
            if t.offset + t.n_bytes > size:
                raise ModelLoadError(
                    f"{self.path} is truncated: tensor {t.name} needs bytes up to "
                    f"{t.offset + t.n_bytes}, file has {size}"
                )

    def _read_config(self) -> ModelConfig:
        from slimserve.models import get_model_class, is_supported

        a = self.arch
        if not is_supported(a):
            raise UnsupportedModel(f"unsupported architecture {a!r} in {self.path}")
        self.model_class = get_model_class(a)
        names = {t.name for t in self.file.tensors}
        heads = self.meta(f"{a}.attention.head_count")
        hidden = self.meta(f"{a}.embedding_length")
        if heads is None or hidden is None:
            raise ModelLoadError(f"{self.path} lacks {a}.attention.head_count/embedding_length")
        vocab = self.meta(f"{a}.vocab_size") or self.file.count("tokenizer.ggml.tokens")
        if not vocab:
            raise ModelLoadError(f"{self.path} has neither {a}.vocab_size nor a vocabulary")
        head_dim = int(self.meta(f"{a}.attention.key_length", hidden // heads))
        found = dict(
            architecture=a,
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(self.meta(f"{a}.feed_forward_length", 0) or 0),
            num_layers=int(self.meta(f"{a}.block_count")),
            num_heads=int(heads),
            num_kv_heads=int(self.meta(f"{a}.attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(self.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self.meta(f"{a}.rope.freq_base", 10000.0)),
            max_position=int(self.meta(f"{a}.context_length", 4096)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            rope_scaling=self._rope_scaling(head_dim),
        )
        try:
            cfg = ModelConfig(**self.model_class.gguf_config(self.meta, found))
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: inconsistent {a} metadata: {e}") from e
        self.model_class = get_model_class(cfg.architecture)  # Mixtral is a `llama` file
        return cfg

    def _rope_scaling(self, head_dim: int) -> tuple | None:
        """RoPE scaling as ModelConfig keeps it: llama.cpp's per-frequency factors (the file's
        rope_freqs tensor, how converted Llama 3.x files carry their scaling), or the linear
        scaling of the metadata; a kind we do not implement is refused, never ignored."""
        a = self.arch
        kind = self.meta(f"{a}.rope.scaling.type")
        found = [t for t in self.file.tensors if t.name == ROPE_FREQS]
        if found:
            t = found[0]
            factors = _float_array(self.file.read(t), t.type_name)
            if factors is None or factors.size != head_dim // 2:
                raise ModelLoadError(
                    f"{self.path}: {ROPE_FREQS} must hold {head_dim // 2} float values"
                    f" (it is {t.type_name}, {factors.size if factors is not None else '?'})"
                )
            if kind not in (None, "none"):
                raise UnsupportedModel(f"{self.path}: {ROPE_FREQS} with rope scaling {kind!r}")
            return (("factors", tuple(float(f) for f in factors)), ("rope_type", "freq_factors"))
        if kind in (None, "none"):
            return None
        if kind == "linear":
            factor = float(self.meta(f"{a}.rope.scaling.factor", 1.0))
            return None if factor == 1.0 else (("factor", factor), ("rope_type", "linear"))
        raise UnsupportedModel(f"{self.path}: rope scaling {kind!r} is not supported")

    def tensor_types(self) -> set[str]:
        """The storage formats of the file's tensors, e.g. {"F32", "Q4_1", "Q8_0"}."""
        return {t.type_name for t in self.file.tensors}

    def weights(
        self, keep: frozenset[str] = frozenset()
    ) -> Iterator[tuple[str, torch.Tensor | QuantizedTensor]]:
        permuted = PERMUTED_QK.get(self.arch, ())
        cfg, own = self.config, self.model_class
        for t in self.file.tensors:
            if t.name in IGNORED:
                continue
            hf_name = gguf_to_hf(t.name, own.gguf_names)
            if hf_name is None:
                raise UnsupportedModel(f"unexpected tensor {t.name} in {self.path}")
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            heads = cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
            raw = self.file.read(t)
            shape = t.shape[::-1]  # numpy order: rows first
            if "{e}" in hf_name:  # experts stacked along the outer dimension
                yield from self._experts(t, hf_name, raw, keep)
                continue
            if t.type_name in keep:
                # Raw blocks, one row of blocks per output feature.
                rows, cols = int(t.shape[1]), int(t.shape[0])
                raw = raw.reshape(rows, -1)
                if kind in permuted:
                    raw = np.ascontiguousarray(_unpermute_rows(raw, heads))
                yield hf_name, QuantizedTensor(t.type_name, (rows, cols), torch.from_numpy(raw))
                continue
            w = _float_array(raw, t.type_name)
            if w is None:
                w = self._dequantize(t, raw)
            w = own.gguf_tensor(hf_name, w.reshape(shape))
            if kind in permuted:
                w = _unpermute_rows(w, heads)
            yield hf_name, torch.from_numpy(np.ascontiguousarray(w))

    def _experts(self, t, hf_name: str, raw: np.ndarray, keep: frozenset[str]):
        """One (HF name, tensor) per expert of a stacked (E, rows, cols) tensor."""
        E = self.config.num_experts
        if len(t.shape) != 3 or int(t.shape[2]) != E:
            raise ModelLoadError(
                f"{self.path}: expert tensor {t.name} has shape {tuple(t.shape[::-1])}, "
                f"expected ({E}, rows, cols) for {E} experts"
            )
        rows, cols = int(t.shape[1]), int(t.shape[0])
        if t.type_name in keep:
            blocks = raw.reshape(E, rows, -1)
            for e in range(E):
                b = torch.from_numpy(np.ascontiguousarray(blocks[e]))
                yield hf_name.replace("{e}", str(e)), QuantizedTensor(t.type_name, (rows, cols), b)
            return
        w = _float_array(raw, t.type_name)
        if w is None:
            w = self._dequantize(t, raw)
        w = w.reshape(E, rows, cols)
        for e in range(E):
            name = hf_name.replace("{e}", str(e))
            w_e = self.model_class.gguf_tensor(name, w[e])
            yield name, torch.from_numpy(np.ascontiguousarray(w_e))

    def _dequantize(self, t, raw: np.ndarray) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = 1
        for d in t.shape[1:]:
            rows *= d
        try:
            return dequantize(raw.reshape(rows, -1), GGMLQuantizationType(t.type_id)).astype(
                np.float32, copy=False
            )
        except NotImplementedError as e:
            raise UnsupportedModel(f"{t.name}: tensor type {t.type_name}: {e}") from e

    def tokenizer(self):
        """Built from the GGUF vocabulary once, then read from the artifact cache."""
        from slimserve.loader import artifacts
        from slimserve.loader.tokenizer import Tokenizer

        key = artifacts.entry_key(artifacts.file_stamp([self.path]), "tokenizer")
        return Tokenizer.from_dict(
            artifacts.cached_json(key, lambda: Tokenizer.from_gguf(self).to_dict())
        )
