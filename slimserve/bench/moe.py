"""`slimserve bench moe`: an MoE model with its experts resident, on disk under a RAM cap with and
without read-ahead, and with a cache so small that every expert is read each time it runs.

No MoE small enough for this machine is published as a file we can install, so by default the
model is synthetic: Qwen3-30B-A3B's layer shapes (hidden 2048, 32 query and 4 KV heads of 128,
128 experts of 768, 8 a token) with fewer layers, its experts as random Q4_0 blocks and the rest
as random Q8_0, the default model's vocabulary. Its routing is that of random weights, not of a
trained model (trained routers are skewed toward hot experts, which caches more), so hit rates
and speeds here describe the mechanism, not Qwen3's own traffic. Each mode runs in its own
process (resident memory is per process), modes alternate within each round, and the report
gives each mode's decode speed as a ratio to reading every expert each time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20

# Qwen3-30B-A3B's shapes (its config.json), but for the number of layers.
SHAPES = dict(hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, moe_ff=768)


def _blocks(rng, rows: int, cols: int, kind: str, std: float, lead=()):
    """Random blocks of `kind` for a (lead..., rows, cols) weight, as (lead..., rows, bytes)."""
    import numpy as np

    size, nbytes = (18, 16) if kind == "Q4_0" else (34, 32)
    n = (*lead, rows, cols // 32)
    out = np.empty((*n, size), dtype=np.uint8)
    out[..., 2:] = rng.integers(0, 256, (*n, nbytes), dtype=np.uint8)
    spread = 4.6 if kind == "Q4_0" else 74.0  # the std of the codes (uniform, centred)
    out[..., :2] = np.array([std / spread], dtype=np.float16).view(np.uint8)
    return out.reshape(*lead, rows, -1)


def synthetic_gguf(path: Path, layers: int, vocab_from: str, seed: int = 0) -> Path:
    """Write the synthetic Qwen3-MoE GGUF (see the module docstring) unless it is there."""
    import gguf
    import numpy as np

    from slimserve.loader.gguf_file import copy_vocabulary

    if path.exists():
        return path
    s, a = SHAPES, "qwen3moe"
    H, D = s["hidden"], s["head_dim"]
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), a)
    for key, value in (("context_length", 4096), ("embedding_length", H), ("block_count", layers),
                       ("feed_forward_length", 6144), ("attention.head_count", s["heads"]),
                       ("attention.head_count_kv", s["kv_heads"]), ("attention.key_length", D),
                       ("attention.value_length", D), ("expert_count", s["experts"]),
                       ("expert_used_count", s["top_k"]),
                       ("expert_feed_forward_length", s["moe_ff"])):  # fmt: skip
        w.add_uint32(f"{a}.{key}", value)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 1e6)
    vocab = copy_vocabulary(w, vocab_from)
    Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0

    def add(name, raw, kind):
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)

    add("token_embd.weight", _blocks(rng, vocab, H, "Q8_0", 0.02), Q8)
    add("output.weight", _blocks(rng, vocab, H, "Q8_0", 0.02), Q8)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    E, F = s["experts"], s["moe_ff"]
    for i in range(layers):
        b = f"blk.{i}."
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(b + name + ".weight", np.ones(H, np.float32))
        for name in ("attn_q_norm", "attn_k_norm"):
            w.add_tensor(b + name + ".weight", np.ones(D, np.float32))
        for name, rows, cols in (("attn_q", s["heads"] * D, H), ("attn_k", s["kv_heads"] * D, H),
                                 ("attn_v", s["kv_heads"] * D, H),
                                 ("attn_output", H, s["heads"] * D)):  # fmt: skip
            add(b + name + ".weight", _blocks(rng, rows, cols, "Q8_0", 0.02), Q8)
        w.add_tensor(b + "ffn_gate_inp.weight", rng.normal(0, 0.02, (E, H)).astype(np.float32))
        for name, rows, cols in (("ffn_gate_exps", F, H), ("ffn_up_exps", F, H),
                                 ("ffn_down_exps", H, F)):  # fmt: skip
            add(b + name + ".weight", _blocks(rng, rows, cols, "Q4_0", 0.02, (E,)), Q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(spec: dict) -> dict:
    """One mode in this process: load, warm up, decode, and report."""
    import torch

    from slimserve import LLM, SamplingParams
    from slimserve.loader import experts
    from slimserve.loader.expert_store import ExpertStore

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cap = spec["cap"]
    t0 = time.perf_counter()
    llm = LLM(
        spec["model"], kv_cache_memory="64MiB",
        expert_cache_memory=None if cap is None else max(cap, 64 * MiB),
        expert_prefetch=spec["prefetch"],
    )  # fmt: skip
    load_s = time.perf_counter() - t0
    eng = llm.engine
    store = getattr(eng.model, "expert_store", None)
    if store is not None and cap == 0:  # the least cache that runs: two layers' experts
        layers = experts.moe_layers(eng.model)
        store.close()
        least = 2 * max(m.top_k for m in layers) * store.slot_bytes
        store = ExpertStore(store.path, layers, least, prefetch=spec["prefetch"])
        eng.model.expert_store = store
        for m in layers:
            m.store = store
    if store is not None:
        store.drop_page_cache = spec["cold"]
    vocab = eng.model_config.vocab_size
    g = torch.Generator().manual_seed(spec["seed"])
    prompt = torch.randint(3, vocab, (spec["prompt"],), generator=g).tolist()
    sp = SamplingParams(max_tokens=spec["tokens"], temperature=0, ignore_eos=True)
    llm.generate([prompt[:8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    if store is not None:
        store.stats, store._judged = dict.fromkeys(store.stats, 0), (0, 0)
    eng.add_request(prompt, sp)
    times = []
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    decode = times[1:]
    out = {
        "mode": spec["mode"],
        "load_s": load_s,
        "prefill_tok_s": spec["prompt"] / times[0],
        "decode_tok_s": len(decode) / sum(decode),
        "rss_mib": _status("VmRSS") / MiB,
        "rss_anon_mib": _status("RssAnon") / MiB,
        "rss_file_mib": _status("RssFile") / MiB,
    }
    if store is not None:
        s = store.summary()
        tokens = spec["prompt"] + spec["tokens"]
        out.update(
            cache_mib=store.num_slots * store.slot_bytes / MiB,
            expert_mib=store.slot_bytes / MiB,
            hit_rate=s["hit_rate"],
            read_ahead_used=s["prefetch_hits"] / max(1, s["prefetch_reads"]),
            mib_read_per_token=s["bytes_read"] / tokens / MiB,
            waits=s["waits"],
            read_ahead_pauses=s["prefetch_pauses"],
        )
        store.close()
    return out


def run_moe(args) -> dict:
    from slimserve.bench.runinfo import run_info
    from slimserve.config import parse_bytes
    from slimserve.loader.resolve import default_model_path

    work = Path(args.workdir or Path(os.environ.get("SLIMSERVE_CACHE", Path.home() / ".cache"
                                                   / "slimserve")) / "bench-moe")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or str(
        synthetic_gguf(work / f"qwen3moe-synthetic-{args.layers}l.gguf", args.layers,
                       default_model_path())  # fmt: skip
    )
    cap = parse_bytes(args.cap)
    modes = {
        "resident": None,
        f"cache {args.cap} + read-ahead": (cap, True),
        f"cache {args.cap}": (cap, False),
        "read every expert": (0, False),
    }
    common = dict(model=model, threads=args.threads, seed=args.seed, prompt=args.prompt,
                  tokens=args.tokens, cold=args.cold)  # fmt: skip
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):  # round 0 builds the cached artifacts and is dropped
        for mode, setting in modes.items():
            c, prefetch = setting if setting else (None, False)
            spec = dict(common, mode=mode, cap=c, prefetch=prefetch)
            res = subprocess.run(
                [sys.executable, "-m", "slimserve.bench.moe", json.dumps(spec)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if res.returncode:
                raise RuntimeError(f"bench moe {mode}: {res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            if r:
                rounds[mode].append(row)
                print(json.dumps(row), file=sys.stderr)
    base = statistics.median(x["decode_tok_s"] for x in rounds["read every expert"])
    rows = []
    for mode, runs in rounds.items():
        row = {k: statistics.median(x[k] for x in runs) for k in runs[0] if k != "mode"}
        row["mode"] = mode
        row["decode_vs_read_every_expert"] = row["decode_tok_s"] / base
        rows.append(row)
        extra = (f", hit rate {row['hit_rate']:.2f}, {row['mib_read_per_token']:.1f} MiB read a "
                 f"token, cache {row['cache_mib']:.0f} MiB"
                 if "hit_rate" in row else "")  # fmt: skip
        print(f"{mode:>28}: decode {row['decode_tok_s']:6.2f} tok/s "
              f"(x{row['decode_vs_read_every_expert']:.2f}), prefill "
              f"{row['prefill_tok_s']:6.1f} tok/s, RSS {row['rss_mib']:.0f} MiB"
              f"{extra}")  # fmt: skip
    result = {"run": run_info(), "model": os.path.basename(model), "layers": args.layers,
              "cold_reads": args.cold, "rounds": args.rounds, "rows": rows,
              "synthetic": args.model is None}  # fmt: skip
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    print(json.dumps(run_one(json.loads(sys.argv[1]))))
