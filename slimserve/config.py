"""Frozen configuration, layered by role: what the model is, how much cache, how to schedule."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from slimserve.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture hyper-parameters, read from GGUF metadata or config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: tuple | None = None  # (("type", "llama3"), ("factor", 8.0), ...) kept hashable
    qk_norm: bool = False  # an RMSNorm over each query and key head (Qwen3, Gemma 3)
    # Sliding-window attention: the window (tokens a query sees, itself included) and, per layer,
    # whether it is a window layer; None: every layer attends in full.
    sliding_window: int = 0
    window_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None  # the RoPE base of window layers, when it differs
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (else head_dim)
    final_logit_softcapping: float | None = None
    # Mixture of experts (layers/moe.py); num_experts 0: every layer has a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalize the chosen experts' weights to sum to 1
    router_order: str = "softmax_topk"  # or "topk_softmax": the softmax over the chosen logits
    shared_expert_intermediate_size: int = 0  # an always-on expert beside the routed ones
    moe_layers: tuple[bool, ...] | None = None  # per layer, whether it is sparse; None: all

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.window_layers is not None and len(self.window_layers) != self.num_layers:
            raise ValueError("window_layers must name every layer")
        if self.moe_layers is not None and len(self.moe_layers) != self.num_layers:
            raise ValueError("moe_layers must name every layer")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, {self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )
        if self.router_order not in ("softmax_topk", "topk_softmax"):
            raise ValueError(f"unknown router order {self.router_order!r}")

    def is_window_layer(self, i: int) -> bool:
        return bool(self.sliding_window and self.window_layers and self.window_layers[i])

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.num_experts and (self.moe_layers is None or self.moe_layers[i]))


KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache: capacity always derives from a memory budget, never a request count."""

    memory_bytes: int = 1 << 30
    block_size: int = 16
    enable_prefix_caching: bool = True
    # Per token: "float32" 4 bytes a value; "bfloat16" (default) 2, for +0.06% perplexity on the
    # default model and faster decode; "int8" per-token, per-head scales, ~3.8x float32's tokens.
    dtype: str = "bfloat16"
    # A disk tier under the RAM pool (kv_cache/tiers.py): published blocks are written here and
    # found again after an eviction or a restart; None: off. `disk_bytes` bounds it.
    disk_dir: str | None = None
    disk_bytes: int = 8 << 30
    # Agent sessions: a finished request with a session_id keeps its blocks this many seconds
    # for the session's next turn (0: off), at most `max_sessions` sessions at once.
    session_ttl: float = 0.0
    max_sessions: int = 256

    def __post_init__(self):
        if self.disk_bytes <= 0:
            raise InvalidRequest(
                "the KV disk cache size must be positive", param="kv_disk_cache_size"
            )
        if self.session_ttl < 0 or self.max_sessions < 1:
            raise InvalidRequest("session_ttl must be >= 0 and max_sessions >= 1")
        if self.dtype not in KV_CACHE_DTYPES:
            raise InvalidRequest(
                f"unknown kv cache dtype {self.dtype!r}; supported: {', '.join(KV_CACHE_DTYPES)}",
                param="kv_cache_dtype",
            )
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidRequest(f"block_size must be a power of two, got {self.block_size}")
        if self.memory_bytes <= 0:
            raise InvalidRequest("kv cache memory must be positive")


SCHEDULING_POLICIES = ("priority", "fcfs")
PRIORITY_RANGE = (-(2**31), 2**31 - 1)  # a request's priority: a 32-bit integer


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Per-step limits: the token budget shared by prefill chunks and decodes."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's own context length
    # "priority": requests run by (priority, arrival), lower first, and a waiting request
    # displaces running ones of a worse priority (they are preempted: swap, engine/scheduler.py);
    # with every priority equal this is first come, first served. "fcfs": arrival order only.
    policy: str = "priority"
    # A time-per-output-token target (ms): steps that hold decodes take only the prompt rows
    # the step-time model says fit in it (never fewer than a minimum). None: the whole budget.
    tpot_slo_ms: float | None = None

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise InvalidRequest("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.tpot_slo_ms is not None and not self.tpot_slo_ms > 0:
            raise InvalidRequest("the TPOT target must be a positive number of milliseconds",
                                 param="tpot_slo_ms")  # fmt: skip
        if self.policy not in SCHEDULING_POLICIES:
            raise InvalidRequest(
                f"unknown scheduling policy {self.policy!r}; supported: priority, fcfs",
                param="scheduling_policy",
            )


SPECULATIVE_METHODS = (None, "ngram", "suffix", "draft")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding (slimserve/spec_decode): None is off; "ngram" prompt lookup,
    "suffix" SuffixDecoding-style lookup in the request and in earlier outputs, "draft" a smaller
    model with the same vocabulary (`model`). `num_tokens` caps a request's drafts per step;
    `adaptive` drafts only what the step's cost model says pays (off: every draft found)."""

    method: str | None = None
    num_tokens: int = 16
    model: str | None = None
    adaptive: bool = True

    def __post_init__(self):
        if self.method not in SPECULATIVE_METHODS:
            raise InvalidRequest(
                f"unknown speculative method {self.method!r}; supported: ngram, suffix, draft",
                param="speculative",
            )
        if not 1 <= self.num_tokens <= 64:
            raise InvalidRequest(
                f"num_speculative_tokens must be in [1, 64], got {self.num_tokens}",
                param="num_speculative_tokens",
            )
        if (self.method == "draft") != (self.model is not None):
            raise InvalidRequest(
                "a draft model (speculative_model) goes with speculative method 'draft', and only"
                " with it", param="speculative_model",
            )  # fmt: skip


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '1.5g' or a plain integer of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidRequest(f"cannot read a memory size from {text!r} (try 2GiB or 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# The one place environment variables are read for engine settings.


def num_threads_from_env() -> int | None:
    value = os.environ.get("SLIMSERVE_NUM_THREADS")
    return int(value) if value else None


def native_kernels_from_env() -> bool:
    """SLIMSERVE_NATIVE_KERNELS=0 keeps every step on the PyTorch paths (slimserve/kernels)."""
    return os.environ.get("SLIMSERVE_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no")


def kernel_flags_from_env() -> list[str]:
    """SLIMSERVE_KERNEL_FLAGS: extra compiler flags for the native kernels, e.g. "-DNO_ZMM" to
    run the 256-bit paths on a CPU with AVX-512 (A/B benchmarks across processes)."""
    return shlex.split(os.environ.get("SLIMSERVE_KERNEL_FLAGS", ""))


def cache_dir_from_env() -> Path:
    """Where built kernels are kept: $SLIMSERVE_CACHE, else ~/.cache/slimserve."""
    value = os.environ.get("SLIMSERVE_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "slimserve"


def artifact_dir_from_env() -> Path | None:
    """Where packed models and tokenizers are cached (loader/artifacts.py): $SLIMSERVE_ARTIFACTS,
    else the cache directory's artifacts/; None when SLIMSERVE_ARTIFACT_CACHE=0 turns it off."""
    if os.environ.get("SLIMSERVE_ARTIFACT_CACHE", "1").lower() in ("0", "false", "no"):
        return None
    value = os.environ.get("SLIMSERVE_ARTIFACTS")
    return Path(value) if value else cache_dir_from_env() / "artifacts"


QUANTIZATIONS = (None, "auto", "none", "gguf", "int4", "int8")
KERNEL_CHOICES = ("auto", "none")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an Engine is built from. `model` None means the default model."""

    model: str | None = None
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    num_threads: int | None = None
    # None/"auto": a GGUF's blocks stay compressed where the int4 kernel reads them, else float32;
    # "none": float32; "gguf", "int4", "int8": see slimserve/quant/__init__.py.
    quantization: str | None = None
    quant_group_size: int = 32  # int4's group of input features: 32, 64 or 128
    # "auto": the native CPU kernels where they are built and take the model (slimserve/kernels);
    # "none": PyTorch ops only. Settled once, when the engine is built.
    kernels: str = "auto"
    # Mixture-of-experts models: keep the experts on disk with a RAM cache of this many bytes
    # (loader/experts.py); None: every expert resident. `expert_prefetch` reads the next
    # layer's predicted experts ahead: off by default, as it lost 11% of decode speed on the
    # only MoE we can measure (random weights, docs/benchmarks.md).
    expert_cache_memory: int | None = None
    expert_prefetch: bool = False
    # One budget (bytes) over the weights, the expert cache, the KV pool (pinned sessions in it)
    # and the disk tier's buffers: the KV pool gets what the rest leaves (engine/memory.py).
    memory_budget: int | None = None

    def __post_init__(self):
        if self.expert_cache_memory is not None and self.expert_cache_memory <= 0:
            raise InvalidRequest(
                "expert cache memory must be positive", param="expert_cache_memory"
            )
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise InvalidRequest("the memory budget must be positive", param="memory_budget")
        if self.kernels not in KERNEL_CHOICES:
            raise InvalidRequest(
                f"unknown kernels setting {self.kernels!r}; supported: auto, none",
                param="kernels",
            )
        if self.quantization not in QUANTIZATIONS:
            raise InvalidRequest(
                f"unknown quantization {self.quantization!r}; supported: "
                + ", ".join(q for q in QUANTIZATIONS if q),
                param="quantization",
            )


# The flat names the front doors (LLM keywords, CLI flags) use for nested config fields.
FLAT_FIELDS = {
    "kv_cache_memory": ("cache", "memory_bytes"),
    "block_size": ("cache", "block_size"),
    "enable_prefix_caching": ("cache", "enable_prefix_caching"),
    "kv_cache_dtype": ("cache", "dtype"),
    "kv_disk_cache": ("cache", "disk_dir"),
    "kv_disk_cache_size": ("cache", "disk_bytes"),
    "session_ttl": ("cache", "session_ttl"),
    "max_sessions": ("cache", "max_sessions"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "max_model_len": ("scheduler", "max_model_len"),
    "scheduling_policy": ("scheduler", "policy"),
    "tpot_slo_ms": ("scheduler", "tpot_slo_ms"),
    "speculative": ("speculative", "method"),
    "num_speculative_tokens": ("speculative", "num_tokens"),
    "speculative_model": ("speculative", "model"),
    "speculative_adaptive": ("speculative", "adaptive"),
    "num_threads": (None, "num_threads"),
    "quantization": (None, "quantization"),
    "quant_group_size": (None, "quant_group_size"),
    "kernels": (None, "kernels"),
    "expert_cache_memory": (None, "expert_cache_memory"),
    "expert_prefetch": (None, "expert_prefetch"),
    "memory_budget": (None, "memory_budget"),
}
SIZED_FIELDS = ("kv_cache_memory", "expert_cache_memory", "kv_disk_cache_size", "memory_budget")
_SECTIONS = {
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "speculative": SpeculativeConfig,
    None: EngineConfig,
}


def default_of(flat_name: str):
    """The default of a flat setting, from its dataclass: the one place defaults are written."""
    section, name = FLAT_FIELDS[flat_name]
    field = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name == name)
    return field.default


def engine_config(model: str | None = None, **flat) -> EngineConfig:
    """An EngineConfig from flat settings (see FLAT_FIELDS); the rest keep their defaults.
    `kv_cache_memory` may be a string such as "2GiB"."""
    unknown = sorted(set(flat) - set(FLAT_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown engine setting(s): {', '.join(unknown)}")
    parts: dict = {section: {} for section in _SECTIONS}
    for key, value in flat.items():
        section, name = FLAT_FIELDS[key]
        sized = key in SIZED_FIELDS and value is not None
        parts[section][name] = parse_bytes(value) if sized else value
    return EngineConfig(
        model=model,
        cache=CacheConfig(**parts["cache"]),
        scheduler=SchedulerConfig(**parts["scheduler"]),
        speculative=SpeculativeConfig(**parts["speculative"]),
        **parts[None],
    )
