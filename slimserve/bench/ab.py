"""`slimserve bench ab --baseline REV`: this tree against another commit, in alternating rounds.

Each side runs bench/ab_figures.py in a fresh process with its own tree first on PYTHONPATH (the
baseline checked out as a git worktree) and its own cache folder, so each builds its own kernels
and model artifacts. Rounds alternate which side goes first; a figure's ratio is candidate /
baseline of the per-side medians, with every round's own ratio beside it, since this is how a
shared, noisy machine still shows a difference: the same sign in every round.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from slimserve.bench.runinfo import run_info
from slimserve.config import cache_dir_from_env

FIGURES = Path(__file__).with_name("ab_figures.py")


def _repo_root() -> Path:
    out = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError("bench ab needs slimserve run from a git checkout")
    return Path(out.stdout.strip())


def _worktree(root: Path, rev: str, where: Path) -> Path:
    path = where / f"tree-{rev.replace('/', '_')}"
    r = subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise RuntimeError(f"cannot check out {rev}: {r.stderr.strip()}")
    return path


def _side(tree: Path, cache: Path, script: Path, flags: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "SLIMSERVE_CACHE": str(cache)}
    r = subprocess.run(
        [sys.executable, str(script), *flags], env=env, capture_output=True, text=True
    )
    if r.returncode:
        raise RuntimeError(f"the run in {tree} failed: {r.stderr.strip()[-800:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if not result.pop("slimserve").startswith(str(tree)):
        raise RuntimeError(f"the run in {tree} imported another slimserve (PYTHONPATH ignored)")
    return result


def run_ab(args) -> dict:
    root = _repo_root()
    flags = [
        "--prompt-len", str(args.prompt_len),
        "--decode-tokens", str(args.decode_tokens),
        "--runs", str(args.runs),
        "--batch", *map(str, args.batch),
    ]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="slimserve-ab-"))
    caches = cache_dir_from_env() / "ab"
    trees, added = {}, []
    try:
        script = work / FIGURES.name  # not run from its folder: bench/ modules would shadow
        shutil.copy(FIGURES, script)
        for side, rev in (("baseline", args.baseline), ("candidate", args.candidate)):
            if rev is None:
                trees[side] = root
            else:
                trees[side] = _worktree(root, rev, work)
                added.append(trees[side])
        rounds = []
        for i in range(args.rounds):
            order = ["baseline", "candidate"][:: 1 if i % 2 == 0 else -1]
            got = {}
            for side in order:
                key = (args.baseline if side == "baseline" else args.candidate) or "tree"
                got[side] = _side(trees[side], caches / key, script, flags)
            rounds.append(got)
            print(f"round {i + 1}: " + ", ".join(
                f"{k} {got['candidate'][k] / got['baseline'][k]:.3f}x" for k in got["baseline"]
            ))  # fmt: skip
    finally:
        for tree in added:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root)
        shutil.rmtree(work, ignore_errors=True)
    figures = {}
    for k in rounds[0]["baseline"]:
        a = statistics.median(r["baseline"][k] for r in rounds)
        b = statistics.median(r["candidate"][k] for r in rounds)
        figures[k] = {
            "baseline": a,
            "candidate": b,
            "ratio": b / a,
            "round_ratios": [r["candidate"][k] / r["baseline"][k] for r in rounds],
        }
    result = {
        **run_info(),
        "baseline": args.baseline,
        "candidate": args.candidate or "working tree",
        "rounds": args.rounds,
        "figures": figures,
    }
    print(f"{'figure':<22} {'baseline':>10} {'candidate':>10} {'ratio':>7}  rounds")
    for k, f in figures.items():
        rr = " ".join(f"{x:.2f}" for x in f["round_ratios"])
        print(f"{k:<22} {f['baseline']:10.1f} {f['candidate']:10.1f} {f['ratio']:6.3f}x  {rr}")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=2)
    return result
