"""Hugging Face model directories: config.json, *.safetensors (memory-mapped), tokenizer.json."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch

from slimserve.config import ModelConfig
from slimserve.errors import ModelLoadError, UnsupportedModel
from slimserve.loader.resolve import ModelSource


class HFDirectorySource(ModelSource):
    def __init__(self, path: str):
        from slimserve.models import is_supported

        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ModelLoadError(f"{path} is not a model directory: config.json is missing")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                self.hf_config = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from e
        if not isinstance(self.hf_config, dict):
            raise ModelLoadError(
                f"{cfg_path} must hold a JSON object, not {type(self.hf_config).__name__}"
            )
        self.files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not self.files:
            raise ModelLoadError(f"{path} has no *.safetensors weight files")
        archs = self.hf_config.get("architectures") or [self.hf_config.get("model_type", "?")]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ModelLoadError(f"{cfg_path}: 'architectures' must be a list of names")
        if not is_supported(archs[0]):
            raise UnsupportedModel(f"unsupported architecture {archs[0]!r} in {cfg_path}")
        self.config = self._read_config(archs[0])

    def _read_config(self, arch: str) -> ModelConfig:
        from slimserve.models import get_model_class

        c = self.hf_config
        try:
            heads = c["num_attention_heads"]
            scaling = c.get("rope_scaling") or c.get("rope_parameters")
            theta = c.get("rope_theta") or (scaling or {}).get("rope_theta", 10000.0)
            if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
                scaling = None
            found = dict(
                architecture=arch,
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"],
                num_layers=c["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=c.get("num_key_value_heads", heads),
                head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                rms_norm_eps=c.get("rms_norm_eps", 1e-5),
                rope_theta=float(theta),
                max_position=c.get("max_position_embeddings", 4096),
                tie_word_embeddings=c.get("tie_word_embeddings", False),
                attention_bias=c.get("attention_bias", arch.startswith("Qwen2")),
                rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            )
            return ModelConfig(**get_model_class(arch).hf_config(c, found))
        except KeyError as e:
            raise ModelLoadError(f"config.json in {self.path} lacks {e.args[0]!r}") from e
        except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
            raise ModelLoadError(
                f"config.json in {self.path} has a field of the wrong shape: {e}"
            ) from e

    def weights(self, keep: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in self.files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name).float()
            except Exception as e:
                if isinstance(e, ModelLoadError):
                    raise
                raise ModelLoadError(f"{file} is truncated or corrupt: {e}") from e

    def tokenizer(self):
        from slimserve.loader.tokenizer import Tokenizer

        eos = self.hf_config.get("eos_token_id")
        gen = os.path.join(self.path, "generation_config.json")
        if os.path.exists(gen):
            with open(gen, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id", eos)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return Tokenizer.from_hf_dir(self.path, eos)
