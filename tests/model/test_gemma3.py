"""Gemma 3 270M (the `gemma` extra's GGUF) against transformers loading the same file: the
SentencePiece tokenizer, logits across the 512-token window, greedy decoding past the window,
and batched against alone on the compressed weights."""

import random

import pytest
import torch

from slimserve import LLM, SamplingParams
from slimserve.loader.resolve import PACKAGED_MODELS, packaged_model_path

from .test_parity import hf_greedy, hf_logits

pytest.importorskip(PACKAGED_MODELS["gemma3-270m"][0], reason="the gemma extra is not installed")

WINDOW = 512


def _corpus() -> str:
    from slimserve.eval.perplexity import DEFAULT_TEXT

    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def gemma_path() -> str:
    return packaged_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    """The reference configuration: float32 weights and KV, as transformers computes."""
    return LLM(gemma_path, quantization="none", kv_cache_dtype="float32", kv_cache_memory="256MiB")


def _without_vocabulary(src: str, dst: str) -> None:
    """`src`'s tensors and gemma3.* metadata without its 262k-entry vocabulary: transformers
    parses a GGUF header twice per load, ~20 s each with the vocabulary."""
    import gguf
    import numpy as np

    from slimserve.loader.gguf_file import GGUFFile

    f = GGUFFile(src)
    w = gguf.GGUFWriter(dst, "gemma3")
    for key, vtype in f.types.items():
        if key.startswith("gemma3."):
            w.add_key_value(key, f.meta(key), gguf.GGUFValueType(vtype))
    w.add_vocab_size(f.count("tokenizer.ggml.tokens"))
    for t in f.tensors:
        raw = f.read(t)
        kind = gguf.GGMLQuantizationType(t.type_id)
        if t.type_name == "F32":
            w.add_tensor(t.name, raw.view(np.float32).reshape(t.shape[::-1]))
        else:
            w.add_tensor(t.name, raw.reshape(-1, t.n_bytes // int(np.prod(t.shape[1:]))),
                         raw_dtype=kind)  # fmt: skip
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf_gemma(gemma_path, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("gemma")
    _without_vocabulary(gemma_path, str(d / "gemma.gguf"))
    return AutoModelForCausalLM.from_pretrained(d, gguf_file="gemma.gguf", dtype=torch.float32)


@pytest.fixture(scope="module")
def long_ids(gemma):
    ids = gemma.tokenizer.encode(_corpus()[:20_000])
    assert len(ids) > 2 * WINDOW
    return ids


def _texts() -> list[str]:
    fixed = [
        "Hello world", "  two  spaces\n\nand a blank line", "12345 digits 3.14159",
        "héllo ünïcode 日本語 Привет 🤖", "\t\ttabs and\ttab", " leading", "trailing ", "   ",
        "a\u00a0nbsp", "emoji 👩\u200d👩\u200d👧 joined", "\x00\x01 control bytes",
        "def f(x):\n    return x**2  # square\n", "<table><caption>x</caption></table>",
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "crlf\r\nline",
        "ﬁ ligature ① circled", "a" * 300, "\U0001f9ec\U00010348 rare planes",
    ]  # fmt: skip
    text, rng = _corpus(), random.Random(0)
    spans = [rng.randrange(len(text) - 400) for _ in range(100)]
    return fixed + [text[i : i + rng.randrange(1, 400)] for i in spans]


def hf_gguf_tokenizer(path: str):
    """transformers' tokenizer for a GGUF file: the reader and converter its AutoTokenizer
    calls with `gguf_file=` (without its config parse, ~15 s for Gemma's vocabulary)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    arch, vocab, _ = get_gguf_tokenizer(path)
    return convert_gguf_tokenizer(arch, vocab)[0]


def test_tokenizer_matches_transformers(gemma, gemma_path):
    ref = hf_gguf_tokenizer(gemma_path)
    ours = gemma.tokenizer
    assert ours.vocab_size == ref.get_vocab_size()
    for text in _texts():
        ids = ref.encode(text).ids  # the converter's tokenizer adds no BOS; its class does
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.encode(text) == [2, *ids]  # the file's add_bos_token
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    # byte fallback: a character with no piece becomes its UTF-8 bytes, and decodes back whole
    rare = "\U00010348"
    assert all(ours.token_text(i).startswith("<0x") for i in ours.encode(rare, False))
    assert ours.decode(ours.encode(rare)) == rare
    assert 106 in ours.eos_ids and ours.token_text(106) == "<end_of_turn>"


def test_logits_match_transformers_across_the_window(gemma, hf_gemma, long_ids):
    ids = long_ids[: WINDOW + 48]
    ref = hf_logits(hf_gemma, ids)
    # In chunks: the later ones read the window from the cache (a whole prompt past the window,
    # attending to its own keys masked, is the tiny Gemma's case in tests/unit/test_hf_models.py)
    ours = gemma.engine.prompt_logits(ids, 96)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    assert (ours - ref).abs().max().item() <= 2e-3
    # 15 window layers and every sixth global; attending in full from every layer moves the
    # logits past position 512 by far more than the bound above (checked when this was written)
    specs = gemma.engine.kv_spec.layers
    assert [s.window for s in specs].count(WINDOW) == 15 and specs[5].window == 0


def test_greedy_decode_past_the_window_matches_transformers(gemma, hf_gemma, long_ids):
    ids = long_ids[: WINDOW - 8]  # decoding crosses the window's edge
    want = hf_greedy(hf_gemma, ids, 24)
    got = gemma.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert list(got[0].outputs[0].token_ids) == want


@pytest.fixture(scope="module")
def gemma_q(gemma_path):
    return LLM(gemma_path, kv_cache_memory="128MiB")  # Q4_K / Q8_0 kept, the rest int8


def test_batched_equals_alone_on_compressed_weights(gemma_q, long_ids):
    llm = gemma_q
    prompts = [long_ids[:n] for n in (7, 300, WINDOW + 40)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    alone = [llm.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone


def test_prefix_cache_hit_past_the_window_and_bounded_window_kv(gemma_q, long_ids):
    """A second request sharing 700 tokens with the first reads them from the prefix cache
    (window groups only the blocks their window still sees) and decodes exactly what it does
    with nothing cached; a long request holds window-layer KV bounded by the window."""
    llm = gemma_q
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    shared = long_ids[:700]
    llm.engine.kv.reset_prefix_cache()
    llm.generate([shared + [5]], sp)
    hit = llm.generate([shared + [9]], sp)[0]
    assert hit.num_cached_tokens >= 688  # 43 full blocks of 16
    llm.engine.kv.reset_prefix_cache()
    cold = llm.generate([shared + [9]], sp)[0]
    assert cold.num_cached_tokens == 0
    assert hit.outputs[0].token_ids == cold.outputs[0].token_ids
    # Held KV per token: the whole context in the global layers' group, the window (plus a
    # step's rows) in the five window groups.
    eng = llm.engine
    spec, held = eng.kv_spec, []
    rid = eng.add_request(long_ids[:2000], SamplingParams(max_tokens=1))
    while eng.has_unfinished():
        eng.step()
        held.append(eng.kv.num_held(rid))
    pages_full = -(-2000 // spec.block_size)
    window_pages = (WINDOW + eng.config.scheduler.max_num_batched_tokens - 2) // 16 + 2
    assert pages_full < max(held) <= pages_full + 5 * window_pages < 6 * pages_full


class _Meta:
    """What Tokenizer.from_gguf reads of a model source: its metadata."""

    def __init__(self, path: str):
        from slimserve.loader.gguf_file import GGUFFile

        self.path, self.file = path, GGUFFile(path)

    def meta(self, key, default=None):
        return self.file.meta(key, default)


def test_llama_style_sentencepiece_matches_transformers(gemma_path, tmp_path):
    """Llama 2 / Mistral GGUF vocabularies: SentencePiece with a space prefix. No such file is
    installable here, so one is written from 40k of Gemma's pieces with Llama's special tokens
    and compared with transformers' tokenizer for the same file."""
    import gguf

    from slimserve.loader.tokenizer import Tokenizer

    src = _Meta(gemma_path)
    tokens, scores = src.meta("tokenizer.ggml.tokens"), src.meta("tokenizer.ggml.scores")
    types = src.meta("tokenizer.ggml.token_type")
    # Gemma lists single characters last: keep them, so text is pieces rather than bytes.
    keep = [
        i for i in range(len(tokens))
        if types[i] in (1, 6) and tokens[i].strip(" ") and (i < 40_000 or len(tokens[i]) == 1)
    ]  # fmt: skip
    vocab = ["<unk>", "<s>", "</s>"] + [tokens[i] for i in keep]
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    for key, value in (("context_length", 512), ("embedding_length", 64), ("block_count", 1),
                       ("feed_forward_length", 128), ("attention.head_count", 4)):  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_tokenizer_model("llama")
    w.add_token_list(vocab)
    w.add_token_scores([0.0, 0.0, 0.0] + [scores[i] for i in keep])
    w.add_token_types([2, 3, 3] + [types[i] for i in keep])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(True)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ours = Tokenizer.from_gguf(_Meta(str(tmp_path / "spm.gguf")))
    ref = hf_gguf_tokenizer(str(tmp_path / "spm.gguf"))
    for text in _texts():
        ids = ref.encode(text).ids
        assert ours.encode(text, add_special_tokens=False) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_cli_generates_from_the_packaged_name_without_a_chat_template(capsys):
    """`--model gemma3-270m` finds the extra's file; a base model without a chat template gets
    the prompt as is (said on stderr), as llama.cpp completes one. (In process: the CLI's own
    start-up is tests/model/test_cli.py's.)"""
    from slimserve.cli import main

    rc = main(["generate", "The capital of France is", "--model", "gemma3-270m",
               "--max-tokens", "8", "--temperature", "0"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no chat template" in err and "gemma-3-270m" in err
    assert len(out.strip()) > 10


def test_bench_kv_reports_the_window_saving(tmp_path, capsys):
    """`slimserve bench kv`: at 1,200 tokens of context the window groups hold their window
    and a 128-token chunk (at most 41 of 75 pages), the global group all 75; at 300 every group
    holds every token."""
    import json

    from slimserve.cli import main

    out = tmp_path / "kv.json"
    rc = main(["bench", "kv", "--model", "gemma3-270m", "--lengths", "300", "1200",
               "--kv-cache-memory", "64MiB", "--max-num-batched-tokens", "128",
               "--output", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    rows = {r["context"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[300]["ratio_to_full"] == pytest.approx(1.0, abs=0.06)  # its last block's slack
    # at most KVCacheSpec.pages_held's bound: 75 global pages, (512 + 128 - 2) // 16 + 2 = 41
    # in each window group; at least the window's 32 each
    assert (75 + 5 * 32) / 450 <= rows[1200]["ratio_to_full"] <= (75 + 5 * 41) / 450
