"""The model-free proposers' lookups against brute force, and the speculator's decisions."""

import random

import pytest

from slimserve.config import SpeculativeConfig
from slimserve.core.request import Request
from slimserve.errors import InvalidRequest
from slimserve.sampling_params import SamplingParams
from slimserve.spec_decode import NgramProposer, Speculator, SuffixProposer
from slimserve.spec_decode.index import SEPARATOR, Match, TokenIndex
from slimserve.spec_decode.speculator import StepCost


def _req(tokens, rid="r"):
    return Request(rid, None, list(tokens), SamplingParams(max_tokens=64), frozenset())


def _agreements(t):
    """For each position c before the end of `t`: how far back t agrees with t's own end."""
    e, out = len(t) - 1, []
    for c in range(e):
        m = 0
        while m < min(12, c + 1) and t[c - m] == t[e - m]:
            m += 1
        out.append(m)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_lookup_finds_the_longest_match_and_the_majority_continuation(seed):
    rng = random.Random(seed)
    t = [rng.randrange(5) for _ in range(rng.randrange(40, 400))]  # many overlapping matches
    index = TokenIndex(t)
    index.extend_to(len(t) - 1)
    found = index.lookup(t, 6, max_match=12)
    agree = _agreements(t)
    best = max(agree)
    occ = [c for c, m in enumerate(agree) if m == best]
    keyed = sum(m >= (4 if best >= 4 else 2) for m in agree)
    if best < 2:
        assert not found.tokens
        return
    if keyed > 64:  # the index looks at the newest 64 occurrences of a key only
        return
    assert found.match_len == best
    nxt = [t[c + 1] for c in occ]
    top = max(nxt.count(x) for x in set(nxt))
    assert nxt.count(found.tokens[0]) == top
    assert found.confidence[0] == top / len(occ)


def test_a_copied_passage_is_drafted_in_full():
    passage = list(range(100, 160))
    t = [5, 6, 7] + passage + [8, 9] + passage[:10]
    index = TokenIndex(t)
    index.extend_to(len(t) - 1)
    found = index.lookup(t, 30)
    assert found.tokens == passage[10:40]
    assert found.confidence == [1.0] * 30 and found.match_len == 10


def test_a_repeating_run_continues_through_its_own_draft():
    t = [1, 2, 3] * 5
    index = TokenIndex(t)
    index.extend_to(len(t) - 1)
    assert index.lookup(t, 9).tokens == [1, 2, 3] * 3


def test_the_global_index_never_crosses_between_outputs():
    prop = SuffixProposer(num_tokens=8, global_tokens=64)
    done = _req([1, 2])
    done.all_token_ids += [10, 11, 12, 13]
    prop.finished(done)
    other = _req([1, 2])
    other.all_token_ids += [20, 21]
    prop.finished(other)
    assert prop.outputs.tokens == [10, 11, 12, 13, SEPARATOR, 20, 21, SEPARATOR]
    req = _req([7, 8, 10, 11])
    m = prop.propose(req, 8)
    assert m.tokens == [12, 13]  # stops at the end of that output
    for i in range(40):  # overflow: the oldest half goes, at an output boundary
        r = _req([0])
        r.all_token_ids += [30 + i, 31 + i, 32 + i]
        prop.finished(r)
    tokens = prop.outputs.tokens
    assert len(tokens) <= 64 and tokens[-1] == SEPARATOR and tokens[0] != SEPARATOR


def test_ngram_takes_the_newest_occurrence():
    t = [1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3]
    found = NgramProposer(num_tokens=2).propose(_req(t), 8)
    assert found.tokens == [7, 7]


def test_the_index_follows_a_growing_request():
    req = _req([4, 5, 6, 4, 5])
    prop = SuffixProposer(num_tokens=4)
    assert prop.propose(req, 4).tokens[:1] == [6]
    req.all_token_ids += [6, 4, 5]
    assert prop.propose(req, 4).tokens[:1] == [6]
    assert req.proposer_state.indexed == req.num_tokens - 1


class _Fixed:
    """Proposes the same drafts with the same confidence for every request."""

    def __init__(self, n, conf):
        self.n, self.conf = n, conf

    def propose(self, req, max_tokens):
        k = min(self.n, max_tokens)
        return Match(list(range(1, k + 1)), [self.conf] * k, 8)

    def finished(self, req):
        pass


def _speculator(conf, a=4.5e-3, b=0.9e-3):
    spec = Speculator(_Fixed(16, conf), 16, budget=512)
    for rows in (1, 2, 4, 8, 1, 3, 9, 16) * 8:
        spec.cost.observe(rows, a + b * rows)
    return spec


def test_step_cost_fit_recovers_a_linear_cost():
    cost = StepCost()
    for rows in (1, 5, 9, 2, 12) * 10:
        cost.observe(rows, 0.004 + 0.001 * rows)
    a, b = cost.fit()
    assert a == pytest.approx(0.004, rel=0.1) and b == pytest.approx(0.001, rel=0.1)


def _verify_all(spec, reqs):
    for r in reqs:
        spec.observe(r, len(r.spec_token_ids), len(r.spec_token_ids))


def test_drafts_grow_with_acceptance_and_shrink_as_the_batch_grows():
    spec = _speculator(0.97)
    alone = _req([1])
    spec.plan([(alone, 64)])
    first = len(alone.spec_token_ids)
    for _ in range(10):  # every draft accepted: the estimate rises, and the drafts lengthen
        _verify_all(spec, [alone])
        spec.plan([(alone, 64)])
    n_alone = len(alone.spec_token_ids)
    assert 1 <= first < n_alone and n_alone >= 8
    batch = [_req([1], f"r{i}") for i in range(32)]
    for _ in range(10):
        spec.plan([(r, 64) for r in batch])
        _verify_all(spec, batch)
    spec.plan([(r, 64) for r in batch])
    per_req = sum(len(r.spec_token_ids) for r in batch) / 32
    assert per_req < n_alone / 2


def test_drafts_that_keep_failing_stop_and_are_tried_again_later():
    spec = _speculator(0.9)
    bad, good = _req([1], "bad"), _req([1], "good")
    spec.plan([(bad, 64), (good, 64)])
    assert bad.spec_token_ids and good.spec_token_ids
    for _ in range(12):  # bad's verifies reject the first draft; good's accept all
        spec.observe(bad, max(len(bad.spec_token_ids), 1), 0)
        _verify_all(spec, [good])
        spec.plan([(bad, 64), (good, 64)])
    assert not bad.spec_token_ids and good.spec_token_ids
    for _ in range(40):  # no drafts: its own record fades towards the shared one
        _verify_all(spec, [good])
        spec.plan([(bad, 64), (good, 64)])
        if bad.spec_token_ids:
            break
    assert bad.spec_token_ids


def test_a_draft_leaves_room_for_the_token_after_it():
    spec = _speculator(1.0)
    req = _req([1])
    spec.plan([(req, 3)])
    assert len(req.spec_token_ids) == 2


def test_speculative_config_is_checked():
    with pytest.raises(InvalidRequest, match="speculative method"):
        SpeculativeConfig("eagle")
    with pytest.raises(InvalidRequest, match="num_speculative_tokens"):
        SpeculativeConfig("suffix", num_tokens=0)
    with pytest.raises(InvalidRequest, match="draft model"):
        SpeculativeConfig("draft")


def test_the_lookup_ceiling_counts_the_steps_of_an_oracle():
    from slimserve.bench.speculative import lookup_ceiling

    prompts = {"copy": list(range(100)), "new": list(range(100))}
    # 35 tokens to decode after the first, each a copy: 16 drafts a step, then one left
    copy = {"copy": list(range(5, 41))}
    assert lookup_ceiling(prompts, copy, 1.0, 0.0, 16) == pytest.approx(35 / 3)
    assert lookup_ceiling(prompts, copy, 1.0, 0.5, 16) == pytest.approx(
        35 * 1.5 / (2 * (1 + 17 * 0.5) + (1 + 2 * 0.5))
    )
    fresh = {"new": list(range(200, 240))}  # nothing to copy: no drafts, no gain
    assert lookup_ceiling(prompts, fresh, 1.0, 0.5, 16) == pytest.approx(1.0)
    # an output that repeats itself is copied from its own earlier tokens
    again = {"new": [300, 301, 302, 303] * 5}
    assert lookup_ceiling(prompts, again, 1.0, 0.0, 16) > 3
