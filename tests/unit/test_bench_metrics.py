"""Benchmark math on synthetic timelines, workload generators and arrival processes."""

import numpy as np
import pytest

from slimserve.bench.datasets import arrival_times, random_requests, shared_prefix_requests
from slimserve.bench.metrics import RequestRecord, parse_slos, summarize


def record(prompt, out, ttft, gaps, error=None):
    return RequestRecord(
        prompt_tokens=prompt,
        output_tokens=out,
        ttft=ttft,
        itl=list(gaps),
        e2e=ttft + sum(gaps),
        error=error,
    )


def test_known_timelines():
    a = record(10, 5, ttft=0.2, gaps=[0.1, 0.1, 0.1, 0.1])  # e2e 0.6, tpot 0.1
    b = record(20, 3, ttft=0.4, gaps=[0.3, 0.3])  # e2e 1.0, tpot 0.3
    failed = RequestRecord(prompt_tokens=7, error="HTTP 500")
    s = summarize([a, b, failed], duration=2.0, slos={"ttft_ms": 300, "tpot_ms": 150})
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_tok_s"] == pytest.approx(4.0)
    assert s["total_tok_s"] == pytest.approx((8 + 30) / 2.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(300.0)
    assert s["ttft_ms"]["median"] == pytest.approx(300.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(200.0)
    assert s["itl_ms"]["median"] == pytest.approx(100.0)
    assert s["e2e_ms"]["p99"] == pytest.approx(np.percentile([600, 1000], 99))
    assert s["goodput"] == pytest.approx(0.5)  # only `a` meets both SLOs


def test_single_token_requests_have_no_tpot():
    s = summarize([record(5, 1, ttft=0.1, gaps=[])], duration=1.0)
    assert s["tpot_ms"]["mean"] is None and s["ttft_ms"]["mean"] == pytest.approx(100.0)


def test_e2e_never_below_ttft():
    r = record(5, 4, ttft=0.25, gaps=[0.05, 0.05, 0.05])
    assert r.e2e >= r.ttft and r.tpot == pytest.approx(0.05)


def test_parse_slos():
    assert parse_slos("ttft_ms=500,tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    with pytest.raises(ValueError, match="unknown SLO"):
        parse_slos("latency=1")


def test_random_requests_are_seeded_and_sized():
    a = random_requests(20, 100, 30, vocab=1000, seed=1, range_ratio=0.5)
    b = random_requests(20, 100, 30, vocab=1000, seed=1, range_ratio=0.5)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert all(50 <= r.prompt_tokens <= 150 and len(r.prompt) == r.prompt_tokens for r in a)
    assert all(15 <= r.output_tokens <= 45 for r in a)
    assert [r.prompt for r in random_requests(3, 10, 5, 1000, seed=2)] != [r.prompt for r in a[:3]]


def test_shared_prefix_groups():
    reqs = shared_prefix_requests(
        groups=3, per_group=4, prefix_len=50, question_len=10, output_len=8, vocab=1000, seed=0
    )
    assert len(reqs) == 12
    prefixes = {tuple(r.prompt[:50]) for r in reqs}
    assert len(prefixes) == 3
    assert len({tuple(r.prompt[50:]) for r in reqs}) == 12  # distinct questions
    assert [tuple(r.prompt[:50]) for r in reqs[:3]] != [tuple(reqs[0].prompt[:50])] * 3


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_rate_matches(burstiness):
    t = arrival_times(4000, rate=20.0, burstiness=burstiness, seed=0)
    assert all(x <= y for x, y in zip(t, t[1:]))
    assert len(t) / t[-1] == pytest.approx(20.0, rel=0.08)


def test_infinite_rate_sends_at_once():
    assert arrival_times(5, float("inf")) == [0.0] * 5


def test_multi_turn_histories_grow():
    from slimserve.bench.datasets import multi_turn_conversations

    (c,) = multi_turn_conversations(
        1, 3, system_len=10, user_len=4, reply_len=6, output_len=5, vocab=1000
    )
    lens = [t.prompt_tokens for t in c.turns]
    assert lens == [14, 24, 34]
    assert c.turns[1].prompt[:14] == c.turns[0].prompt  # each turn resends the history


def test_compare_ratios(tmp_path):
    import json

    from slimserve.bench.compare import compare

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"decode_tok_s": 10.0, "x": {"y": 4}, "machine": {"cpus": 2}}))
    b.write_text(json.dumps({"decode_tok_s": 15.0, "x": {"y": 2}, "other": 1}))
    assert compare(str(a), str(b)) == [("decode_tok_s", 10.0, 15.0, 1.5), ("x.y", 4.0, 2.0, 0.5)]
