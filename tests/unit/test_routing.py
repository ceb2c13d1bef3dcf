"""The router's choice of replica (distributed/routing.py), without Ray."""

import pytest

from slimserve.distributed.routing import Router


def _prompt(tenant: int, n: int = 64) -> list[int]:
    return [1000 * tenant + i for i in range(n)]


def test_prefix_routing_weighs_the_cached_prefix_against_queued_work():
    r = Router(2, "prefix", block_size=16, decode_cost=128)
    first, matched = r.choose(_prompt(1, 640))
    assert matched == 0
    r.finished(first, r.started(first, _prompt(1, 640), matched))
    other = 1 - first
    r.finished(other, r.started(other, _prompt(2, 640), 0))  # tenant 2 lives on the other
    assert r.choose(_prompt(1, 640) + [7, 8, 9]) == (first, 40)  # 40 blocks of 16 sent there
    assert r.choose(_prompt(2, 640)) == (other, 40)
    # A request in flight on tenant 1's replica (128 of decode) costs less than the 640 prompt
    # tokens the other would compute: it stays.
    busy = r.started(first, _prompt(3, 64), 0)
    assert r.choose(_prompt(1, 640))[0] == first
    # 900 prompt tokens queued there cost more than the prefix saves: load wins.
    more = r.started(first, _prompt(4, 900), 0)
    assert r.choose(_prompt(1, 640)) == (other, 0)
    r.finished(first, more)
    r.finished(first, busy)
    assert r.queued == [0, 0] and r.in_flight == [0, 0]


def test_a_failed_replica_is_avoided_and_forgotten_until_it_answers():
    r = Router(2, "prefix", block_size=16)
    r.finished(0, r.started(0, _prompt(1), 0), failed=True)
    assert r.choose(_prompt(1)) == (1, 0)  # down, and its estimate is gone
    r.finished(0, r.started(0, _prompt(3), 0))  # answered again: up
    assert r.choose(_prompt(3)) == (0, 4)


def test_round_robin_and_least_loaded_ignore_prefixes():
    rr = Router(3, "round-robin")
    assert [rr.choose(_prompt(1))[0] for _ in range(4)] == [0, 1, 2, 0]
    ll = Router(2, "least-loaded")
    ll.started(0, _prompt(1), 0)
    assert ll.choose(_prompt(1)) == (1, 0)
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router(2, "random")
