"""Which native kernels each module runs, settled when the engine is built (not per step).

A module with native paths names its kernels in a class attribute NATIVE and keeps the ones it
runs in `self.native`; the engine calls `select` once, and tests or A/B benchmarks narrow one
module with `without`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from slimserve import kernels  # read at call time: this module loads with the package


def chosen(names: tuple[str, ...], enabled: bool = True) -> frozenset[str]:
    """Which of a module's kernels `names` it runs: those available, when `enabled`."""
    return frozenset(k for k in names if enabled and kernels.available(k))


def select(model: torch.nn.Module, enabled: bool) -> None:
    """Settle, for every module of `model` with native paths (a class attribute NATIVE naming its
    kernels), which of them it runs: its `native` set. The engine calls this once at build."""
    for m in model.modules():
        names = getattr(type(m), "NATIVE", None)
        if names:
            m.native = chosen(names, enabled)


@contextmanager
def without(module: torch.nn.Module, *names: str):
    """Run `module` and its submodules with the kernels `names` (every one when none is named)
    turned off, then restore their choice: for A/B tests and benchmarks of one module."""
    saved = {m: m.native for m in module.modules() if getattr(type(m), "NATIVE", None)}
    try:
        for m in saved:
            m.native = m.native - set(names) if names else frozenset()
        yield
    finally:
        for m, native in saved.items():
            m.native = native
