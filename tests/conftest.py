"""Shared fixtures. The real model and transformers load once per session."""

import importlib.util
import os

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(scope="session")
def gguf_path() -> str:
    from slimserve.loader import default_model_path

    path = default_model_path()
    assert os.path.exists(path), "the default model is part of `make test`'s setup"
    return path


@pytest.fixture(scope="session")
def llm(gguf_path):
    from slimserve import LLM

    # The reference configuration: float32 weights and KV cache, compared with transformers.
    return LLM(gguf_path, kv_cache_memory="512MiB", quantization="none", kv_cache_dtype="float32")


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' own Llama, loading the same GGUF (it dequantizes to float32)."""
    assert importlib.util.find_spec("accelerate"), "transformers needs accelerate to load GGUF"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    return model.eval()
