"""Copy (HF name, tensor) pairs into a model, following its packed-module table."""

from collections.abc import Iterable

import torch
from torch import nn

from slimserve.errors import ModelLoadError


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed: dict[str, tuple[str, int]],
    skip: tuple[str, ...] = (),
) -> None:
    """Modules with a `load(leaf, tensor, shard)` method place their own tensors (layout, shards);
    other parameters are copied as they are. Every expected (parameter, shard) must arrive."""
    expected = set()
    for name, _ in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        shards = len(getattr(module, "output_sizes", [0]))
        expected |= {(name, s) for s in range(shards)}
    loaded = set()
    for name, tensor in weights:
        if name.startswith(skip):
            continue
        module_path, leaf = name.rsplit(".", 1)
        parent, _, child = module_path.rpartition(".")
        shard = 0
        if child in packed:
            target, shard = packed[child]
            module_path = f"{parent}.{target}"
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ModelLoadError(f"checkpoint tensor {name} has no place in the model") from None
        try:
            if hasattr(module, "load"):
                module.load(leaf, tensor, shard)
            else:
                getattr(module, leaf).data.copy_(tensor)
        except (ValueError, RuntimeError, AttributeError) as e:
            raise ModelLoadError(f"cannot load {name}: {e}") from e
        owner = getattr(module, "tied_head", None)
        if owner is not None:  # the tied embedding's tensor lands in the head's parameter
            module_path = next(n for n, m in model.named_modules() if m is owner)
        loaded.add((f"{module_path}.{leaf}", shard))
    missing = sorted(n for n, _ in expected - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
