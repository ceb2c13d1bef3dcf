"""Architecture registry: name (GGUF `general.architecture` or HF `architectures[0]`) -> class."""

import importlib

_LLAMA = ("slimserve.models.llama", "LlamaForCausalLM")

_GEMMA3 = ("slimserve.models.gemma3", "Gemma3ForCausalLM")

_REGISTRY = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3": _GEMMA3,
    "Gemma3ForCausalLM": _GEMMA3,
    "Qwen3ForCausalLM": _LLAMA,
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
}


def is_supported(architecture: str) -> bool:
    return architecture in _REGISTRY


def get_model_class(architecture: str):
    module, cls = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), cls)
