"""The packed-model and tokenizer cache: bit-identical to a fresh pack, never stale, never
loaded when damaged."""

import logging
import os
import shutil

import pytest
import torch

from slimserve.engine.loading import load_model
from slimserve.loader import open_model

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "artifacts"
    monkeypatch.setenv("SLIMSERVE_ARTIFACTS", str(folder))
    monkeypatch.setenv("SLIMSERVE_ARTIFACT_CACHE", "1")
    return folder


@pytest.fixture
def model_copy(tmp_path, gguf_path):
    """The default model under a path of its own, so the test can change it."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(gguf_path, path)
    return str(path)


def entries(folder, prefix):
    return sorted(p for p in folder.glob(f"{prefix}-*") if not p.name.endswith(".check"))


def test_a_warm_load_maps_exactly_what_a_fresh_pack_builds(cache, model_copy):
    source = open_model(model_copy)
    fresh = load_model(source)  # builds and writes
    (entry,) = entries(cache, "model")
    warm = load_model(open_model(model_copy))  # maps the entry
    a, b = fresh.state_dict(), warm.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert entries(cache, "model") == [entry]  # read, not written again
    layer_a = fresh.get_submodule("model.layers.0.mlp.down_proj")
    layer_b = warm.get_submodule("model.layers.0.mlp.down_proj")
    h = torch.randn(3, layer_a.in_features)
    assert torch.equal(layer_a(h), layer_b(h))


def test_engines_from_the_cache_generate_the_same_tokens(cache, model_copy):
    from slimserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    cold = LLM(model_copy, kv_cache_memory="32MiB")
    out_cold = cold.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert entries(cache, "model") and entries(cache, "tokenizer")
    warm = LLM(model_copy, kv_cache_memory="32MiB")
    out_warm = warm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out_cold == out_warm
    text = "Hello, world! 123 <|im_end|> ünïcode"
    assert warm.tokenizer.encode(text) == cold.tokenizer.encode(text)
    assert warm.tokenizer.eos_ids == cold.tokenizer.eos_ids
    assert warm.tokenizer.chat_template == cold.tokenizer.chat_template


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "empty", "no sidecar"])
def test_a_damaged_entry_is_rebuilt_with_a_log_line(cache, model_copy, damage, caplog):
    reference = load_model(open_model(model_copy)).state_dict()
    (entry,) = entries(cache, "model")
    data = entry.read_bytes()
    mid = len(data) // 2
    flipped = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    damaged = {
        "truncated": data[:mid],
        "flipped bytes": data[:mid] + flipped + data[mid + 64 :],
        "empty": b"",
        "no sidecar": data,
    }[damage]  # fmt: skip
    # A new file in its place: `reference` still maps the old one, and cutting a mapped file
    # short under a reader is a SIGBUS, not a test of the cache.
    tmp = entry.with_suffix(".damaged")
    tmp.write_bytes(damaged)
    os.replace(tmp, entry)
    if damage == "no sidecar":
        os.unlink(entry.with_name(entry.name + ".check"))
    with caplog.at_level(logging.WARNING, logger="slimserve"):
        rebuilt = load_model(open_model(model_copy)).state_dict()
    assert "truncated or corrupt; rebuilding" in caplog.text
    for name in reference:
        assert torch.equal(reference[name], rebuilt[name]), name
    assert entries(cache, "model") == [entry] and len(entry.read_bytes()) == len(data)


def test_a_changed_file_is_never_served_from_a_stale_entry(cache, model_copy):
    first = load_model(open_model(model_copy))
    # Same name and size, different weights: flip one byte in the middle of the file (a
    # tensor's data, not the header or the ends the stamp reads).
    with open(model_copy, "r+b") as f:
        size = os.path.getsize(model_copy)
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x55]))
    second = load_model(open_model(model_copy))
    assert len(entries(cache, "model")) == 2
    a, b = first.state_dict(), second.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_cache_can_be_turned_off(cache, model_copy, monkeypatch):
    monkeypatch.setenv("SLIMSERVE_ARTIFACT_CACHE", "0")
    load_model(open_model(model_copy))
    open_model(model_copy).tokenizer()
    assert not cache.exists()
