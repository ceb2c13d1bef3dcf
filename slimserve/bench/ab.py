"""`slimserve bench ab --baseline REV`: this tree against another commit, measured in pairs.

Each side is a live bench/ab_figures.py process with its own tree first on PYTHONPATH (the
baseline checked out as a git worktree) and its own cache folder, so each builds its own kernels
and model artifacts. Both load the model once; then every figure is taken `--rounds` times as
back-to-back pairs (one side, then the other, alternating who goes first), so a pair sees the
same machine. On a shared machine the load drifts over seconds to minutes (whole separate runs
of one side differed by +-25%), and a pair is a second or two apart: a figure's ratio is the
median of its pairs' ratios, every pair's ratio kept beside it.
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


class _Side:
    """A live ab_figures.py process of one tree, answering one figure at a time."""

    def __init__(self, tree: Path, cache: Path, script: Path, flags: list[str]):
        env = {**os.environ, "PYTHONPATH": str(tree), "SLIMSERVE_CACHE": str(cache)}
        self.tree = tree
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *flags],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        ready = self._answer()
        if not str(ready.get("ready", "")).startswith(str(tree)):
            self.close()
            raise RuntimeError(f"the run in {tree} imported another slimserve (PYTHONPATH ignored)")

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"the run in {self.tree} failed (run bench/ab_figures.py there to see why)"
            )
        return json.loads(line)

    def figure(self, what: str) -> float:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return float(self._answer())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_ab(args) -> dict:
    root = _repo_root()
    flags = ["--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens)]
    names = [f"prefill_{args.prompt_len}_tok_s"] + [f"decode_b{b}_tok_s" for b in args.batch]
    asks = ["prefill"] + [f"decode {b}" for b in args.batch]
    values = {n: {"baseline": [], "candidate": []} for n in names}
    work = Path(tempfile.mkdtemp(prefix="slimserve-ab-"))
    caches = cache_dir_from_env() / "ab"
    added, sides = [], {}
    try:
        script = work / FIGURES.name  # not run from its folder: bench/ modules would shadow
        shutil.copy(FIGURES, script)
        for side, rev in (("baseline", args.baseline), ("candidate", args.candidate)):
            tree = root
            if rev is not None:
                tree = _worktree(root, rev, work)
                added.append(tree)
            sides[side] = _Side(tree, caches / (rev or "tree"), script, flags)
        for name, ask in zip(names, asks):
            for i in range(args.rounds):  # pairs back to back, alternating who goes first
                for side in ("baseline", "candidate")[:: 1 if i % 2 == 0 else -1]:
                    values[name][side].append(sides[side].figure(ask))
            v = values[name]
            pairs = " ".join(f"{c / b:.2f}" for b, c in zip(v["baseline"], v["candidate"]))
            print(f"{name}: {pairs}", flush=True)
    finally:
        for s in sides.values():
            s.close()
        for tree in added:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root)
        shutil.rmtree(work, ignore_errors=True)
    figures = {}
    for k, v in values.items():
        pairs = [c / b for b, c in zip(v["baseline"], v["candidate"])]
        figures[k] = {
            "baseline": statistics.median(v["baseline"]),
            "candidate": statistics.median(v["candidate"]),
            "ratio": statistics.median(pairs),
            "pair_ratios": pairs,
        }
    result = {
        **run_info(),
        "baseline": args.baseline,
        "candidate": args.candidate or "working tree",
        "rounds": args.rounds,
        "figures": figures,
    }
    print(f"{'figure':<22} {'baseline':>10} {'candidate':>10} {'ratio':>7}  (median of pairs)")
    for k, f in figures.items():
        print(f"{k:<22} {f['baseline']:10.1f} {f['candidate']:10.1f} {f['ratio']:6.3f}x")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump(result, fh, indent=2)
    return result
