"""`slimserve bench ab`'s side protocol on the real model: a live process of one tree answers
figures one at a time, and a side that imports another tree's slimserve is refused."""

import shutil

import pytest

from slimserve.bench.ab import FIGURES, _repo_root, _Side
from slimserve.config import cache_dir_from_env


def test_a_side_answers_figures_and_checks_its_tree(tmp_path):
    try:
        root = _repo_root()
    except RuntimeError:
        pytest.skip("not a git checkout")
    script = tmp_path / FIGURES.name
    shutil.copy(FIGURES, script)
    flags = ["--prompt-len", "24", "--decode-tokens", "4"]
    cache = cache_dir_from_env()  # warm: the kernels and model this run already built
    side = _Side(root, cache, script, flags)
    try:
        assert side.figure("prefill") > 0
        assert side.figure("decode 2") > 0
    finally:
        side.close()
    with pytest.raises(RuntimeError, match="imported another slimserve"):
        _Side(tmp_path, cache, script, flags).close()
