"""Architecture registry: name (GGUF `general.architecture` or HF `architectures[0]`) -> class."""

import importlib

_LLAMA = ("slimserve.models.llama", "LlamaForCausalLM")

_GEMMA3 = ("slimserve.models.gemma3", "Gemma3ForCausalLM")

_QWEN_MOE = ("slimserve.models.qwen_moe", "Qwen2MoeForCausalLM")

_MIXTRAL = ("slimserve.models.mixtral", "MixtralForCausalLM")

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
    "qwen2moe": _QWEN_MOE,
    "qwen3moe": _QWEN_MOE,
    "mixtral": _MIXTRAL,  # a GGUF `llama` file with experts (see LlamaForCausalLM.gguf_config)
    "Qwen2MoeForCausalLM": _QWEN_MOE,
    "Qwen3MoeForCausalLM": _QWEN_MOE,
    "MixtralForCausalLM": _MIXTRAL,
}


def is_supported(architecture: str) -> bool:
    return architecture in _REGISTRY


def get_model_class(architecture: str):
    module, cls = _REGISTRY[architecture]
    return getattr(importlib.import_module(module), cls)
