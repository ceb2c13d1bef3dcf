"""Pure pieces of the engine core: stable block hashes, counter-based noise, verification."""

import os
import subprocess
import sys

import torch

from slimserve.engine import noise, rejection
from slimserve.engine.sampler import Sampler, SamplingRow
from slimserve.kv_cache.hashing import block_hashes, kv_salt
from slimserve.sampling_params import SamplingParams

TOKENS = list(range(100, 164))
SCRIPT = (
    "from slimserve.kv_cache.hashing import block_hashes, kv_salt;"
    "print([h.hex() for h in block_hashes(list(range(100, 164)), 16,"
    " kv_salt('model:abc', 'bfloat16', 16, 'gguf', 32))])"
)


def test_block_hashes_are_the_same_in_another_process():
    here = [
        h.hex() for h in block_hashes(TOKENS, 16, kv_salt("model:abc", "bfloat16", 16, "gguf", 32))
    ]
    for seed in ("1", "2"):  # Python's own hash() would differ between these
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        assert eval(out) == here
    assert len(here) == 4 and len(set(here)) == 4


def test_block_hashes_chain_and_salt():
    salt = kv_salt("m", "bfloat16", 16)
    a = block_hashes(TOKENS, 16, salt)
    b = block_hashes(TOKENS[:16] + [7] + TOKENS[17:], 16, salt)
    assert a[0] == b[0] and all(x != y for x, y in zip(a[1:], b[1:]))  # a change carries on
    assert block_hashes(TOKENS, 16, kv_salt("m", "int8", 16))[0] != a[0]


def _row(params, position, seed=5):
    return SamplingRow(params, seed, position, [1, 2, 3], [1, 2, 3] + [9] * position)


def test_a_seeded_draw_depends_on_seed_and_position_only():
    V = 500
    logits = torch.randn(6, V)
    p = SamplingParams(temperature=1.0)
    other = SamplingParams(temperature=0.7, top_k=20)
    sampler = Sampler()
    alone = [sampler(logits[i : i + 1], [_row(p, 10 + i)]).token_ids[0] for i in range(6)]
    k_at_a_time = sampler(logits, [_row(p, 10 + i) for i in range(6)]).token_ids
    mixed = sampler(
        torch.cat((logits[:3], torch.randn(1, V), logits[3:])),
        [_row(p, 10), _row(p, 11), _row(p, 12), _row(other, 4, seed=9), _row(p, 13),
         _row(p, 14), _row(p, 15)],
    ).token_ids  # fmt: skip
    assert alone == k_at_a_time == mixed[:3] + mixed[4:]
    assert noise.key(5, 10) != noise.key(5, 11) != noise.key(6, 10)


def test_noise_is_uniform_enough():
    u = noise.uniform([noise.key(s, 0) for s in range(64)], 4096)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert abs(torch.corrcoef(torch.stack((u[:, :-1].flatten(), u[:, 1:].flatten())))[0, 1]) < 0.01


def test_one_hot_verify_keeps_the_agreeing_prefix():
    assert rejection.verify([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert rejection.verify([5, 9, 7, 8], [5, 6, 7]) == [5, 9]  # a correction at the first miss
    assert rejection.verify([4], []) == [4]


def test_verify_with_draft_probabilities_keeps_the_target_distribution():
    """Drafts drawn from q, verified against p: the first token's frequencies follow p."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(4)
    n = 6000
    for t in range(n):
        draft = int(torch.multinomial(q[0], 1, generator=torch.Generator().manual_seed(t)))
        rows = [_row(params, 2 * t, seed=1), _row(params, 2 * t + 1, seed=1)]
        counts[rejection.verify_with_probs(p, q, [draft], rows)[0]] += 1
    assert torch.allclose(counts / n, p[0], atol=0.025)
