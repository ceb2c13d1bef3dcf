"""Sampler properties on random logits: filters are never violated, seeds reproduce."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimserve.core.request import Request
from slimserve.engine.sampler import Sampler, filter_probs
from slimserve.sampling_params import SamplingParams

V = 64


def make_req(params, prompt=(1, 2, 3)):
    return Request("r", None, list(prompt), params, frozenset())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    top_k=st.integers(0, V),
    top_p=st.floats(0.05, 1.0),
    min_p=st.floats(0.0, 0.9),
    temperature=st.floats(0.1, 3.0),
)
def test_samples_stay_inside_top_k_top_p_min_p(seed, top_k, top_p, min_p, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, V, generator=g) * 4
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed
    )
    probs = torch.softmax(logits[0] / temperature, -1)
    order = probs.argsort(descending=True)
    k = top_k or V
    # The allowed set by definition: rank < k, mass before it < top_p, prob >= min_p * max.
    allowed = set()
    mass = 0.0
    renorm = probs[order[:k]].sum()
    for rank, tok in enumerate(order.tolist()):
        # top_p == 1 disables the nucleus; the float sum may reach 1.0 early, so allow 1e-5 slack.
        if rank >= k or (top_p < 1.0 and mass >= top_p + 1e-5):
            break
        allowed.add(tok)
        mass += (probs[tok] / renorm).item()
    kept = filter_probs(logits / temperature, [params])[0]
    assert set(kept.nonzero().flatten().tolist()) <= allowed
    sampler = Sampler()
    req = make_req(params)
    for _ in range(20):
        tok = sampler(logits, [req]).token_ids[0]
        assert tok in allowed
        assert kept[tok] > 0


def test_greedy_is_argmax():
    logits = torch.randn(4, V)
    reqs = [make_req(SamplingParams(temperature=0.0)) for _ in range(4)]
    assert Sampler()(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.randn(3, V)
    p = SamplingParams(temperature=1.0, seed=1234)
    a = [Sampler()(logits[:1], [make_req(p)]).token_ids[0] for _ in range(1)]
    solo = make_req(p)
    batch = [
        make_req(SamplingParams(temperature=1.0)),
        make_req(p),
        make_req(SamplingParams(temperature=1.0)),
    ]
    seq_solo = [Sampler()(logits[:1], [solo]).token_ids[0] for _ in range(10)]
    seq_batch = [Sampler()(logits[[1, 0, 2]], batch).token_ids[1] for _ in range(10)]
    assert seq_solo == seq_batch
    assert a[0] == seq_solo[0]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    req = make_req(SamplingParams(temperature=1.0, seed=0))
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[Sampler()(logits, [req]).token_ids[0]] += 1
        req.append_token(0)  # draws are a function of (seed, position): move to the next one
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_penalties_push_repeated_tokens_down():
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    req = make_req(SamplingParams(temperature=0.0, presence_penalty=2.0), prompt=[7])
    req.all_token_ids += [5]  # token 5 was generated already
    assert Sampler()(logits, [req]).token_ids[0] != 5
    rep = make_req(SamplingParams(temperature=0.0, repetition_penalty=5.0), prompt=[5])
    logits2 = torch.zeros(1, V)
    logits2[0, 5], logits2[0, 6] = 1.0, 0.5
    assert Sampler()(logits2, [rep]).token_ids[0] == 6  # 1.0 / 5 < 0.5


def test_logprobs_are_raw_model_logprobs():
    logits = torch.randn(1, V)
    req = make_req(SamplingParams(temperature=0.0, logprobs=3))
    out = Sampler()(logits, [req])
    lp = torch.log_softmax(logits[0], -1)
    entry = out.logprobs[0]
    tok = out.token_ids[0]
    assert abs(entry[tok] - lp[tok].item()) < 1e-6
    assert set(lp.topk(3).indices.tolist()) <= set(entry)
