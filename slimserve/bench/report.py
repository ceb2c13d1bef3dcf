"""`slimserve bench report DIR`: one slimserve-vs-llama.cpp table (markdown) and a
latency-throughput plot from the JSON files `make bench` leaves in DIR."""

from __future__ import annotations

import glob
import json
import os


def _load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _row(
    name: str,
    ours: float | None,
    peer: float | None,
    fmt: str = "{:.1f}",
    lower_is_better: bool = False,
) -> str:
    if ours is None:
        return ""
    peer_s = fmt.format(peer) if isinstance(peer, (int, float)) else ("-" if peer is None else peer)
    ratio = ""
    if isinstance(peer, (int, float)) and peer and ours:
        ratio = f"{(peer / ours if lower_is_better else ours / peer):.2f}×"
    return f"| {name} | {fmt.format(ours)} | {peer_s} | {ratio} |\n"


def markdown(results_dir: str) -> str:
    out = [
        "| measurement | slimserve | llama.cpp | ratio (higher = slimserve better) |\n",
        "|---|---:|---:|---:|\n",
    ]
    lat = _load(os.path.join(results_dir, "latency.json"))
    if lat:
        peer = lat.get("llama.cpp") if isinstance(lat.get("llama.cpp"), dict) else {}
        out.append(
            _row(
                f"prefill {lat['prompt_len']} tokens (tok/s)",
                lat["prefill_tok_s"],
                peer.get("prefill_tok_s"),
            )
        )
        out.append(_row("decode batch 1 (tok/s)", lat["decode_tok_s"], peer.get("decode_tok_s")))
        out.append(
            _row("decode: fraction of memory bandwidth", lat["bandwidth_fraction"], None, "{:.2f}")
        )
    thr = _load(os.path.join(results_dir, "throughput.json"))
    for kind, row in (thr or {}).get("workloads", {}).items():
        peer = row.get("llama.cpp") if isinstance(row.get("llama.cpp"), dict) else {}
        ours = row["slimserve"]
        out.append(
            _row(f"offline {kind}: total tok/s", ours["total_tok_s"], peer.get("total_tok_s"))
        )
        out.append(
            _row(f"offline {kind}: output tok/s", ours["output_tok_s"], peer.get("output_tok_s"))
        )
        hf = row.get("transformers")
        if isinstance(hf, dict):
            out.append(
                _row(
                    f"offline {kind}: total tok/s, transformers generate in the llama.cpp column",
                    ours["total_tok_s"],
                    hf["total_tok_s"],
                )
            )
    runs = [
        r
        for path in sorted(glob.glob(os.path.join(results_dir, "serve*.json")))
        for r in (_load(path) or {}).get("runs", [])
        if "summary" in r
    ]
    by = {(r["engine"], r["concurrency"]): r["summary"] for r in runs}
    for conc in sorted({c for _, c in by}):
        ours, peer = by.get(("slimserve", conc)), by.get(("llama.cpp", conc)) or {}
        if not ours:
            continue
        out.append(
            _row(f"serve c={conc}: output tok/s", ours["output_tok_s"], peer.get("output_tok_s"))
        )
        for metric in ("ttft_ms", "tpot_ms"):
            for q in ("median", "p99"):
                out.append(
                    _row(
                        f"serve c={conc}: {metric[:4].upper()} {q} (ms)",
                        ours[metric][q],
                        (peer.get(metric) or {}).get(q),
                        "{:.0f}",
                        lower_is_better=True,
                    )
                )
    return "".join(out)


def plot(results_dir: str, path: str) -> bool:
    """x: output tok/s, y: TPOT p50, one line per engine, one point per concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = [
        r
        for p in sorted(glob.glob(os.path.join(results_dir, "serve*.json")))
        for r in (_load(p) or {}).get("runs", [])
        if "summary" in r
    ]
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in sorted({r["engine"] for r in runs}):
        pts = sorted(
            (r["concurrency"], r["summary"]["output_tok_s"], r["summary"]["tpot_ms"]["median"])
            for r in runs
            if r["engine"] == engine
        )
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=engine)
        for c, x, y in pts:
            ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("TPOT p50 (ms)")
    ax.set_title("latency vs throughput (same machine, same GGUF)")
    ax.legend()
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run_report(args) -> None:
    table = markdown(args.results)
    header = (
        "# Benchmark results (generated)\n\nWritten by `make bench` "
        "(`slimserve bench report`) from the JSON files of one run; see benchmarks.md for "
        "the analysis.\n\n"
    )
    with open(args.markdown, "w") as f:
        f.write(header + table)
        if plot(args.results, args.plot):
            rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.markdown)))
            f.write(f"\n![latency vs throughput]({rel})\n")
    print(table)
