"""`slimserve bench compare A.json B.json`: ratios B / A of every number both results share."""

from __future__ import annotations

import json


def _numbers(obj, prefix="") -> dict[str, float]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("records", "machine", "params", "prefill_tok_s_all", "decode_tok_s_all"):
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            key = v.get("engine", i) if isinstance(v, dict) else i
            conc = v.get("concurrency") if isinstance(v, dict) else None
            tag = f"{key}@{conc}" if conc is not None else f"{key}"
            out.update(_numbers(v, f"{prefix}{tag}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def compare(path_a: str, path_b: str) -> list[tuple[str, float, float, float | None]]:
    with open(path_a) as f:
        a = _numbers(json.load(f))
    with open(path_b) as f:
        b = _numbers(json.load(f))
    rows = []
    for key in sorted(set(a) & set(b)):
        rows.append((key, a[key], b[key], b[key] / a[key] if a[key] else None))
    return rows


def run_compare(args) -> None:
    rows = compare(args.a, args.b)
    if not rows:
        print("the two results share no figures")
    width = max((len(k) for k, *_ in rows), default=10)
    for key, va, vb, ratio in rows:
        r = f"{ratio:8.3f}x" if ratio is not None else "       -"
        print(f"{key:<{width}}  {va:14.4g}  {vb:14.4g}  {r}")
