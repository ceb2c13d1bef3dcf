"""The CLI as a user runs it: a subprocess, the real model, streamed text on stdout."""

import json
import subprocess
import sys

import torch


def slimserve(*args, stdin=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "slimserve", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_answers(gguf_path):
    r = slimserve(
        "generate",
        "What is the capital of France? Answer in one sentence.",
        "--max-tokens",
        "24",
        "--temperature",
        "0",
        "--model",
        gguf_path,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_keeps_history_and_exits_on_eof(llm):
    from slimserve import SamplingParams

    r = slimserve(
        "chat",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--quantization",  # the mode of the `llm` fixture it is compared with
        "none",
        stdin="My name is Ada.\nWhat is my name?\n",
    )
    assert r.returncode == 0, r.stderr
    turns = r.stdout.split(">>> ")
    assert len(turns) == 4  # two turns, then the prompt that met EOF
    # The second answer is the one the model gives with the whole history in its prompt.
    p = SamplingParams(max_tokens=32, temperature=0.0)
    history = [{"role": "user", "content": "My name is Ada."}]
    first = llm.chat(history, p)[0].outputs[0].text
    history += [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "What is my name?"},
    ]
    second = llm.chat(history, p)[0].outputs[0].text
    assert turns[1].strip() == first.strip()
    assert turns[2].strip() == second.strip()


def test_bench_latency_writes_json(tmp_path):
    out = tmp_path / "lat.json"
    r = slimserve(
        "bench",
        "latency",
        "--runs",
        "1",
        "--prompt-len",
        "64",
        "--decode-tokens",
        "8",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["prefill_tok_s"] > 0 and data["decode_tok_s"] > 0
    assert 0 < data["bandwidth_fraction"] < 1.5
    assert len(data["git_commit"].removesuffix("-dirty")) == 40
    assert data["versions"]["torch"] == torch.__version__
    assert data["machine"]["cpus"] >= 1


def test_bench_latency_names_a_missing_ik_llama_bench(tmp_path):
    r = slimserve("bench", "latency", "--ik-llama-bench", str(tmp_path / "llama-bench"))
    assert r.returncode == 2
    assert "--ik-llama-bench" in r.stderr and "not an executable file" in r.stderr


def test_bench_throughput_with_transformers_peer(tmp_path):
    """The offline bench runs transformers generate on the same prompts as the slow reference."""
    out = tmp_path / "thr.json"
    r = slimserve(
        "bench",
        "throughput",
        "--workloads",
        "random",
        "--num-prompts",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--hf-prompts",
        "2",
        "--parallel",
        "2",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["workloads"]["random"]
    assert row["slimserve"]["output_tokens"] == 16
    hf = row["transformers"]
    assert hf["num_prompts"] == 2 and hf["output_tokens"] == 8 and hf["total_tok_s"] > 0
    peer = row["llama.cpp"]  # measured when the bench extra is installed, else a skip reason
    assert isinstance(peer, str) and peer.startswith("skipped") or peer["output_tokens"] == 16


def test_eval_perplexity_on_the_shipped_text(tmp_path):
    out = tmp_path / "ppl.json"
    r = slimserve(
        "eval",
        "perplexity",
        "--max-tokens-eval",
        "300",
        "--window",
        "256",
        "--stride",
        "128",
        "--kv-cache-dtype",
        "int8",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["tokens_scored"] == 299 and 5 < data["perplexity"] < 80
    assert data["memory"]["quantization"] == "gguf" and data["memory"]["kv_cache_dtype"] == "int8"
    assert "perplexity" in r.stdout
    bad = slimserve("eval", "perplexity", "--text", str(tmp_path / "missing.txt"))
    assert bad.returncode == 2 and "cannot read --text" in bad.stderr


def test_bench_spec_writes_json_and_generate_speculates(tmp_path):
    out = tmp_path / "spec.json"
    r = slimserve(
        "bench", "spec", "--prompts-limit", "2", "--max-tokens", "48", "--rounds", "1",
        "--concurrency", "2", "--no-peers", "--output", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    methods = data["batch1_repetitive"]["methods"]
    assert set(methods) == {"off", "ngram", "suffix"}
    assert not data["batch1_repetitive"]["mismatches"]  # every method gave plain's tokens
    assert methods["suffix"]["accepted_tokens"] > 0
    assert data["batch1_repetitive"]["lookup_ceiling"]["speedup"] >= 1.0
    assert set(data["serving"]["2"]) == {"off", "ngram", "suffix"}
    g = slimserve("generate", "Say hello.", "--max-tokens", "8", "--speculative", "suffix")
    assert g.returncode == 0, g.stderr
    bad = slimserve("generate", "Hi", "--speculative", "draft")
    assert bad.returncode == 2 and "speculative_model" in bad.stderr


def test_generate_with_constraints(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({
        "type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
        "required": ["colour"], "additionalProperties": False,
    }))  # fmt: skip
    r = slimserve("generate", "Pick a colour.", "--json-schema", str(schema), "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["colour"] in ("red", "blue")
    r = slimserve("generate", "Yes or no?", "--choice", "yes", "--choice", "no")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no")
    bad = slimserve("generate", "Hi", "--regex", "a(+")
    assert (
        bad.returncode == 2 and "--regex" not in bad.stdout and "invalid constraint" in bad.stderr
    )
    missing = slimserve("generate", "Hi", "--grammar", str(tmp_path / "nope.lark"))
    assert missing.returncode == 2 and "cannot read --grammar" in missing.stderr
