"""Copy (HF name, tensor) pairs into a model, following its packed-module table."""

from collections.abc import Iterable

import torch
from torch import nn

from slimserve.errors import ModelLoadError
from slimserve.layers.linear import Linear


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 packed: dict[str, tuple[str, int]]) -> None:
    params = dict(model.named_parameters())  # tied weights appear once
    expected = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in params}
    loaded = set()
    for name, tensor in weights:
        if name.startswith("lm_head.") and "lm_head.weight" not in params:
            continue  # tied to the embedding
        module_path, leaf = name.rsplit(".", 1)
        parent, _, child = module_path.rpartition(".")
        rows = slice(None)
        if child in packed:
            target, shard = packed[child]
            module_path = f"{parent}.{target}"
            module = model.get_submodule(module_path)
            assert isinstance(module, Linear)
            rows = module.shard_rows(shard)
        param_name = f"{module_path}.{leaf}"
        param = params.get(param_name)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name} has no place in the model")
        dst = param.data[rows]
        if dst.shape != tensor.shape:
            raise ModelLoadError(f"{name}: shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
        dst.copy_(tensor)
        loaded.add(param_name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
