"""The router's choice of replica (distributed/routing.py), without Ray."""

import pytest

from slimserve.distributed.routing import Router


def _prompt(tenant: int, n: int = 64) -> list[int]:
    return [1000 * tenant + i for i in range(n)]


def test_prefix_routing_follows_the_cached_prefix_until_load_wins():
    r = Router(2, "prefix", block_size=16, imbalance=2)
    first, matched = r.choose(_prompt(1))
    assert matched == 0
    r.started(first, _prompt(1), matched)
    r.finished(first)
    other = 1 - first
    r.started(other, _prompt(2), 0)  # tenant 2 lives on the other replica
    r.finished(other)
    again, matched = r.choose(_prompt(1) + [7, 8, 9])
    assert (again, matched) == (first, 4)  # 4 full blocks of 16 already sent there
    assert r.choose(_prompt(2)) == (other, 4)
    # The tenant's replica is 2 requests busier than the other: load wins.
    r.started(first, None, 0)
    r.started(first, None, 0)
    assert r.choose(_prompt(1)) == (other, 0)


def test_a_failed_replica_is_avoided_and_forgotten_until_it_answers():
    r = Router(2, "prefix", block_size=16)
    r.started(0, _prompt(1), 0)
    r.finished(0, failed=True)
    assert r.choose(_prompt(1)) == (1, 0)  # down, and its estimate is gone
    r.started(0, _prompt(3), 0)
    r.finished(0)  # answered again: up
    assert r.choose(_prompt(3)) == (0, 4)


def test_round_robin_and_least_loaded_ignore_prefixes():
    rr = Router(3, "round-robin")
    assert [rr.choose(_prompt(1))[0] for _ in range(4)] == [0, 1, 2, 0]
    ll = Router(2, "least-loaded")
    ll.started(0, _prompt(1), 0)
    assert ll.choose(_prompt(1)) == (1, 0)
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router(2, "random")
