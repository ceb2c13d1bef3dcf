"""Build a model and load its weights (quantized by module swap when a method applies)."""

from __future__ import annotations

import torch

from slimserve.loader import artifacts
from slimserve.models import get_model_class


def load_model(
    source,
    quantization: str | None = None,
    group_size: int = 32,
    progress: bool = False,
    native: bool = True,
) -> torch.nn.Module:
    """Build the model and load its weights; with a quantization method, its layers are swapped
    for collectors first and packed after (slimserve/quant), so no float copy is kept. `native`
    False keeps layouts only the native kernels read out of the model. A packed model is mapped
    from the artifact cache when an earlier load wrote it (loader/artifacts.py)."""
    from slimserve import quant
    from slimserve.models import is_supported

    cfg = source.config
    if not is_supported(cfg.architecture):
        from slimserve.errors import UnsupportedModel

        raise UnsupportedModel(f"unsupported architecture {cfg.architecture!r} in {source.path}")
    method = quant.resolve_method(quantization, source, group_size)
    if not method:  # float32: nothing is derived from the file, so nothing is cached
        return _build(source, method, group_size, progress, native)
    key = artifacts.entry_key(
        artifacts.file_stamp(source.source_files()), "model", method, group_size, native
    )
    model, hit = artifacts.cached_model(
        key, lambda: _build(source, method, group_size, progress, native)
    )
    model.from_cache = hit
    return model


def _build(source, method, group_size, progress, native) -> torch.nn.Module:
    from slimserve import quant

    model = get_model_class(source.config.architecture)(source.config)
    if method:
        quant.prepare(model, method, group_size)
    weights = source.weights(quant.keep_types(method))
    if progress:
        from tqdm import tqdm

        weights = tqdm(weights, desc=f"Loading {source.name}", unit="tensor", leave=False)
    model.load_weights(weights)
    if method:
        quant.finalize(model, native)
    model.quantization = method or "none"
    model.from_cache = False
    return model.eval()
