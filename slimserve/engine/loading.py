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
    expert_cache_memory: int | None = None,
    expert_prefetch: bool = False,
) -> torch.nn.Module:
    """Build the model and load its weights; with a quantization method, its layers are swapped
    for collectors first and packed after (slimserve/quant), so no float copy is kept. `native`
    False keeps layouts only the native kernels read out of the model. A packed model is mapped
    from the artifact cache when an earlier load wrote it (loader/artifacts.py).

    `expert_cache_memory` (bytes): an MoE model's experts go to an experts file once and run
    from a RAM cache of that size (loader/experts.py); the model keeps its dense part."""
    from slimserve import quant
    from slimserve.models import is_supported

    cfg = source.config
    if not is_supported(cfg.architecture):
        from slimserve.errors import UnsupportedModel

        raise UnsupportedModel(f"unsupported architecture {cfg.architecture!r} in {source.path}")
    method = quant.resolve_method(quantization, source, group_size)
    if expert_cache_memory is not None:
        return _offloaded(source, method, group_size, progress, native, expert_cache_memory,
                          expert_prefetch)  # fmt: skip
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


def _offloaded(source, method, group_size, progress, native, cap, prefetch) -> torch.nn.Module:
    """The dense part of the model (cached like any packed model) and a store over its experts
    file, written beside it by the first load."""
    from slimserve.errors import InvalidRequest
    from slimserve.loader import experts

    if not source.config.num_experts:
        raise InvalidRequest(
            f"--expert-cache-memory applies to mixture-of-experts models; {source.name} has no "
            "experts",
            param="expert_cache_memory",
        )
    key = artifacts.entry_key(
        artifacts.file_stamp(source.source_files()), "model", method, group_size, native,
        "experts-offloaded",
    )  # fmt: skip
    path = artifacts.experts_path(key) or experts.temporary_experts_path()

    def build():
        model = _build(source, method, group_size, progress, native)
        experts.strip_experts(model, path)
        artifacts.note_experts_file(path, experts.experts_file_size(model))
        return model

    if method and artifacts.directory() is not None:
        artifacts.require_experts_file(key, path)
        model, hit = artifacts.cached_model(key, build)
    else:  # float32, or no cache: build, and write the experts file for this process
        model, hit = build(), False
    model.from_cache = hit
    from slimserve.loader.expert_store import ExpertStore

    model.expert_store = store = ExpertStore(
        path, experts.moe_layers(model), cap, prefetch=prefetch
    )
    for moe in experts.moe_layers(model):
        moe.store = store
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
