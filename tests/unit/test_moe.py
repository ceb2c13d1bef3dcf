"""Mixtures of experts: tiny random Qwen2-MoE, Qwen3-MoE and Mixtral checkpoints written by
transformers (safetensors, and GGUF with stacked expert tensors) against transformers."""

import pytest
import torch

from slimserve import LLM, SamplingParams
from tests.unit.test_hf_models import VOCAB, make_hf_dir

MOE = dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64)
CASES = {
    # a shared expert with its sigmoid gate, q/k/v biases, top-k weights not renormalized,
    # layer 1 dense (mlp_only_layers)
    "qwen2moe-shared": ("qwen2moe", dict(MOE, shared_expert_intermediate_size=80,
                                         num_hidden_layers=3, mlp_only_layers=[1])),
    # per-head q/k norms, renormalized top-k
    "qwen3moe": ("qwen3moe", dict(MOE, head_dim=32, norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
}  # fmt: skip


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_moe_logits_and_greedy_match_transformers(tmp_path, llm, case):
    arch, overrides = CASES[case]
    ref = make_hf_dir(tmp_path, llm, arch, **overrides)
    ours = LLM(
        str(tmp_path), kv_cache_memory="16MiB", max_num_batched_tokens=64, kv_cache_dtype="float32"
    )
    cfg = ours.engine.model_config
    assert cfg.num_experts == 8 and cfg.is_moe_layer(0)
    assert cfg.is_moe_layer(1) == (case != "qwen2moe-shared")
    ids = _ids(150, 1)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = ours.engine.prompt_logits(ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    out = ours.generate([ids[:60]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    with torch.no_grad():
        hf = ref.generate(
            torch.tensor([ids[:60]]), max_new_tokens=8, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, 60:].tolist()  # fmt: skip
    assert out[0].outputs[0].token_ids == hf


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip
_EXPERTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
            "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}  # fmt: skip


def _permute(w, n_head: int):
    """llama.cpp's rotary row order for `llama` files (the inverse of the loader's)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def write_moe_gguf(path, hf_dir, ref, gguf_arch: str, gguf_path: str, expert_type=None):
    """A GGUF as llama.cpp's converter lays one out: experts stacked (E, rows, cols) per layer,
    in `expert_type` blocks (None: F32). The vocabulary is the default model's."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    from slimserve.loader.gguf_file import copy_vocabulary

    c, a = ref.config, gguf_arch
    w = gguf.GGUFWriter(str(path), a)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    E = getattr(c, "num_experts", None) or c.num_local_experts
    moe_ff = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    for key, value in (("context_length", 512), ("embedding_length", c.hidden_size),
                       ("block_count", c.num_hidden_layers),
                       ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads),
                       ("attention.head_count_kv", c.num_key_value_heads),
                       ("attention.key_length", head_dim), ("attention.value_length", head_dim),
                       ("expert_count", E), ("expert_used_count", c.num_experts_per_tok),
                       ("expert_feed_forward_length", moe_ff)):  # fmt: skip
        w.add_uint32(f"{a}.{key}", value)
    shared = getattr(c, "shared_expert_intermediate_size", 0)
    if shared:
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", shared)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_float32(f"{a}.rope.freq_base", float(c.rope_parameters["rope_theta"]))
    copy_vocabulary(w, gguf_path)
    stacks = {}
    for name, t in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        a32 = t.float().numpy()
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a32)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a32)
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", a32)
        elif ".experts." in name:
            i = name.split(".")[2]
            e, proj = name.split(".experts.")[1].split(".")[:2]
            stacks.setdefault((i, _EXPERTS[proj]), {})[int(e)] = a32
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            kind = _GGUF_NAMES[rest.removesuffix(".weight").removesuffix(".bias")]
            if a == "llama" and kind in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if kind == "attn_q" else c.num_key_value_heads
                a32 = _permute(a32, heads)
            if kind == "ffn_gate_inp_shexp":
                a32 = a32.reshape(-1)
            w.add_tensor(f"blk.{i}.{kind}.{rest.rsplit('.', 1)[1]}", a32)
    for (i, kind), experts in stacks.items():
        stack = np.stack([experts[e] for e in range(E)])
        if expert_type is None:
            w.add_tensor(f"blk.{i}.{kind}.weight", stack)
        else:
            q = gguf.quants.quantize(stack, expert_type)
            w.add_tensor(f"blk.{i}.{kind}.weight", q, raw_shape=q.shape, raw_dtype=expert_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {"qwen2moe-shared": "qwen2moe", "qwen3moe": "qwen3moe", "mixtral": "llama"}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_moe_gguf_with_stacked_experts_matches_transformers(tmp_path, llm, gguf_path, case):
    arch, overrides = CASES[case]
    # llama.cpp's qwen2moe makes every layer sparse
    overrides = dict(overrides, tie_word_embeddings=False, mlp_only_layers=[])
    ref = make_hf_dir(tmp_path, llm, arch, **overrides)
    path = tmp_path / "moe.gguf"
    write_moe_gguf(path, tmp_path, ref, GGUF_CASES[case], gguf_path)
    ours = LLM(str(path), kv_cache_memory="16MiB", kv_cache_dtype="float32")
    assert ours.engine.model_config.architecture == ("mixtral" if case == "mixtral" else arch)
    ids = _ids(100, 2)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = ours.engine.prompt_logits(ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_q8_0_experts_stay_compressed_and_batch_invariant(tmp_path, llm, gguf_path):
    """Experts in Q8_0 blocks run through the int8 kernels: logits close to transformers over the
    dequantized weights (activations are rounded to int8 per 32), and each prompt of a batch
    decodes what it decodes alone."""
    import gguf

    from slimserve.quant.int4 import Int4Linear

    arch, overrides = CASES["qwen3moe"]
    ref = make_hf_dir(tmp_path, llm, arch, **dict(overrides, tie_word_embeddings=False))
    path = tmp_path / "moe-q8.gguf"
    write_moe_gguf(path, tmp_path, ref, "qwen3moe", gguf_path, gguf.GGMLQuantizationType.Q8_0)
    ours = LLM(str(path), kv_cache_memory="16MiB", max_num_batched_tokens=64)
    moe = ours.engine.model.model.layers[0].mlp
    expert = moe.experts[5]
    assert isinstance(expert.gate_up_proj, Int4Linear) and expert.down_proj.eight_bit
    # Expert 5 of layer 0 against the float expert over the blocks' own values (the kernel rounds
    # activations to int8 per 32 values: ~0.7% here).
    x = torch.randn(7, ref.config.hidden_size, generator=torch.Generator().manual_seed(5))
    ex, q8 = ref.model.layers[0].mlp.experts, gguf.GGMLQuantizationType.Q8_0
    gate_up, down = (
        torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p[5].numpy(), q8), q8))
        for p in (ex.gate_up_proj.detach(), ex.down_proj.detach())
    )
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(g) * u) @ down.T
    got = moe.experts[5](x)
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    # The whole model (its other layers rounded to int8 per 32 by the gguf method) stays close.
    ids = _ids(80, 4)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = ours.engine.prompt_logits(ids)
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    prompts = [ids[:n] for n in (5, 40, 77)]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in ours.generate(prompts, sp)]
    alone = [ours.generate([p], sp)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone


def test_experts_on_disk_under_a_cap_compute_what_resident_experts_do(tmp_path, llm, gguf_path):
    """Q8_0 experts written to the experts file and read back into a cache of two layers'
    experts (every pass misses and evicts), with and without read-ahead: logits bit-identical
    to the resident model, a warm second load maps the cached dense part and reuses the file."""
    import gguf

    arch, overrides = CASES["qwen3moe"]
    ref = make_hf_dir(tmp_path, llm, arch, **dict(overrides, tie_word_embeddings=False))
    path = tmp_path / "moe-q8.gguf"
    write_moe_gguf(path, tmp_path, ref, "qwen3moe", gguf_path, gguf.GGMLQuantizationType.Q8_0)
    ids = _ids(90, 6)
    kw = dict(kv_cache_memory="16MiB", max_num_batched_tokens=32)
    resident = LLM(str(path), **kw)
    want = resident.engine.prompt_logits(ids)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want_text = resident.generate([ids[:30]], sp)[0].outputs[0].token_ids
    # One expert's record: gate_up and down packed (int8 as two 4-bit halves) with bf16 scales.
    record = 128 * 64 + 4 * 128 * 2 * 2 + 64 * 64 + 4 * 64 * 2 * 2
    for prefetch in (False, True):
        ours = LLM(str(path), expert_cache_memory=6 * record, expert_prefetch=prefetch, **kw)
        store = ours.engine.model.expert_store
        assert not any(len(m.experts) for m in ours.engine.model.modules()
                       if hasattr(m, "expert_layout"))  # fmt: skip
        assert store.slot_bytes == record and store.num_slots == 6
        assert torch.equal(ours.engine.prompt_logits(ids), want)
        assert ours.generate([ids[:30]], sp)[0].outputs[0].token_ids == want_text
        s = store.summary()
        assert s["misses"] > 0 and s["bytes_read"] >= s["misses"] * record
        assert (s["prefetch_reads"] > 0) == prefetch
    # /metrics reports the store's counters
    from types import SimpleNamespace

    from slimserve.server.metrics import EngineCollector

    scraped = {m.name: m.samples[0].value for m in EngineCollector(
        SimpleNamespace(engine=ours.engine, stats=ours.engine.stats)).collect()}  # fmt: skip
    assert scraped["slimserve_expert_cache_misses"] == s["misses"] > 0
    assert scraped["slimserve_expert_cache_bytes"] == 6 * record
    assert ours.engine.model.from_cache  # the second load mapped the first one's dense part


def test_expert_cache_bad_settings_and_a_truncated_experts_file(tmp_path, llm, gguf_path):
    from slimserve.errors import InvalidRequest, ModelLoadError
    from slimserve.loader import experts
    from slimserve.loader.expert_store import ExpertStore

    arch, overrides = CASES["mixtral"]
    make_hf_dir(tmp_path, llm, arch, **overrides)
    with pytest.raises(InvalidRequest, match=r"needs at least 4 .*two layers' 2 experts"):
        LLM(str(tmp_path), kv_cache_memory="16MiB", expert_cache_memory="1KiB")
    with pytest.raises(InvalidRequest, match="applies to mixture-of-experts models"):
        LLM(gguf_path, kv_cache_memory="16MiB", expert_cache_memory="64MiB")
    ours = LLM(str(tmp_path), kv_cache_memory="16MiB", expert_cache_memory="1MiB")
    store = ours.engine.model.expert_store
    with pytest.raises(ModelLoadError, match="truncated"):
        os_truncate(store.path, 100)
        ExpertStore(store.path, experts.moe_layers(ours.engine.model), 1 << 20)


def os_truncate(path, size):
    import os

    os.truncate(path, size)
