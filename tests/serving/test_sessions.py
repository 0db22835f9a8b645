"""Sessions: shared weights, bounded number and memory, idle expiry, pooled caches."""

from __future__ import annotations

import asyncio

import pytest
import torch

from vaops.serving.sessions import (
    POLICY_OVERHEAD,
    SessionError,
    SessionManager,
    SessionsFull,
    UnknownSession,
    device_memory,
    sessions_that_fit,
)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_sessions_share_weights_and_own_caches(tiny_weights):
    manager = SessionManager(tiny_weights, max_sessions=3, max_cache_bytes=None, idle_timeout_s=60)
    a, b = manager.open("a"), manager.open("b")
    a.policy.reset("x", seed=0)
    b.policy.reset("x", seed=0)
    assert a.policy.engine.model is b.policy.engine.model is tiny_weights.transformer
    assert a.policy.engine.cache is not b.policy.engine.cache
    assert a.policy.engine.cache.k.data_ptr() != b.policy.engine.cache.k.data_ptr()
    assert manager.bytes_per_session == a.policy.engine.cache.nbytes() > 0
    assert manager.total_cache_bytes() == 2 * manager.bytes_per_session


def test_limits_by_count_and_by_memory(tiny_weights):
    manager = SessionManager(tiny_weights, max_sessions=8, max_cache_bytes=None, idle_timeout_s=60)
    per = manager.bytes_per_session
    budget = SessionManager(tiny_weights, max_sessions=8, max_cache_bytes=int(2.5 * per), idle_timeout_s=60)
    assert manager.capacity == 8 and budget.capacity == 2
    budget.open("a")
    budget.open("b")
    with pytest.raises(SessionsFull, match="all 2 sessions are in use"):
        budget.open("c")
    budget.close("a")
    budget.open("c")
    with pytest.raises(ValueError, match="smaller than one session's KV cache"):
        SessionManager(tiny_weights, max_sessions=8, max_cache_bytes=per // 2, idle_timeout_s=60)
    with pytest.raises(SessionError, match="already exists"):
        budget.open("c")
    with pytest.raises(SessionError, match="must be 1-128 characters"):
        budget.open("bad id!")


def test_sessions_that_fit():
    assert sessions_that_fit(10 * 2**30, 3 * 2**30, 2**30) == 3
    assert sessions_that_fit(10 * 2**30, 3 * 2**30, 2 * 2**30) == 2
    assert sessions_that_fit(2**30, 3 * 2**30, 0) == 0
    assert sessions_that_fit(2**30, 3 * 2**30, 4 * 2**30) == 0  # less free than the reserve


def test_limits_by_the_devices_memory(tiny_weights):
    """The host's real available memory (the tiny preset's sessions run on the CPU): a reserve larger than it
    leaves room for the probe's session alone, and a new policy is refused while memory is short, in the terms
    of a full session table (429 / RESOURCE_EXHAUSTED with a retry hint), pooled policies still given out."""
    free, total = device_memory(torch.device("cpu"))
    assert 0 < free <= total
    roomy = SessionManager(tiny_weights, max_sessions=4, max_cache_bytes=None, idle_timeout_s=60,
                           memory_reserve_bytes=0)
    assert roomy.capacity == 4
    assert roomy.memory_per_session == int(roomy.bytes_per_session * (1 + POLICY_OVERHEAD))
    short = SessionManager(tiny_weights, max_sessions=4, max_cache_bytes=None, idle_timeout_s=60,
                           memory_reserve_bytes=total)
    assert short.capacity == 1
    short.open("a")
    with pytest.raises(SessionsFull, match="all 1 sessions are in use"):
        short.open("b")
    # Memory that runs short after start-up: the check at each new policy, not the start-up capacity.
    roomy.open("a")  # the probe's pooled policy
    roomy.memory_reserve_bytes = total
    with pytest.raises(SessionsFull, match=r"no CPU memory for another session: .* GiB free, a session needs") as e:
        roomy.open("b")
    assert e.value.retry_after_s >= 1 and "b" not in roomy
    roomy.close("a")
    roomy.open("c")  # the pooled policy needs no new memory
    roomy.memory_reserve_bytes = 0
    d = roomy.open("d")
    assert d.policy is not roomy.get("c").policy  # a new one, memory being available again


def test_idle_sessions_expire_and_their_policies_are_reused(tiny_weights):
    clock = Clock()
    manager = SessionManager(tiny_weights, max_sessions=2, max_cache_bytes=None, idle_timeout_s=10, clock=clock)
    a = manager.open("a")
    clock.now = 5
    manager.open("b")
    clock.now = 12  # a idle for 12 s, b for 7 s
    assert manager.expire_idle() == ["a"]
    with pytest.raises(UnknownSession, match="unknown session 'a'"):
        manager.get("a")
    c = manager.open("c")
    assert c.policy is a.policy  # pooled: the cache buffers are allocated once
    clock.now = 16
    manager.get("b")  # use keeps it alive
    clock.now = 25
    assert manager.expire_idle() == ["c"]


def test_busy_sessions_neither_expire_nor_get_pooled_until_done(tiny_weights):
    clock = Clock()
    manager = SessionManager(tiny_weights, max_sessions=2, max_cache_bytes=None, idle_timeout_s=10, clock=clock)

    async def scenario():
        a = manager.open("a")
        async with a.lock:  # an operation in flight
            clock.now = 100
            assert manager.expire_idle() == []
            manager.close("a")
            assert manager.open("b").policy is not a.policy  # still computing: not handed out again
        manager.release(a)
        assert manager.open("c").policy is a.policy

    asyncio.run(scenario())


def test_warm_sessions_are_warmed_before_any_client_and_handed_out_first(tiny_weights, monkeypatch, caplog):
    """`warm_sessions`: that many pooled policies run Policy.warm_up (their CUDA graphs captured on a GPU)
    before the server reports ready, bounded by the capacity; robots get them before any new policy, and a session
    given a new one is logged with the flag that avoids it."""
    from vaops.models.policy import Policy

    warmed = []
    monkeypatch.setattr(Policy, "warm_up", lambda self: warmed.append(self) or 4)
    manager = SessionManager(tiny_weights, max_sessions=3, max_cache_bytes=None, idle_timeout_s=60, warm_up=True,
                             warm_sessions=2)
    assert len(warmed) == 2 and len(set(map(id, warmed))) == 2
    with caplog.at_level("WARNING", logger="vaops.serving.sessions"):
        a, b = manager.open("a"), manager.open("b")
        assert caplog.records == []  # warmed policies
        c = manager.open("c")
    assert {id(a.policy), id(b.policy)} == set(map(id, warmed)) and c.policy not in warmed
    [record] = caplog.records
    assert record.getMessage().startswith("session c gets a policy that was not warmed up (the 2 warmed at start are "
                                          "in use)") and "--warm-sessions N" in record.getMessage()
    caplog.clear()
    manager.close("c")
    with caplog.at_level("WARNING", logger="vaops.serving.sessions"):
        manager.open("d")  # c's policy, back in the pool
    assert caplog.records == []
    assert len(SessionManager(tiny_weights, max_sessions=2, max_cache_bytes=None, idle_timeout_s=60, warm_up=True,
                              warm_sessions=5)._pool) == 2
    warmed.clear()
    cpu = SessionManager(tiny_weights, max_sessions=3, max_cache_bytes=None, idle_timeout_s=60, warm_sessions=2)
    assert warmed == []  # no warm-up asked for (CPU servers)
    with caplog.at_level("WARNING", logger="vaops.serving.sessions"):
        cpu.open("a"), cpu.open("b")
    assert caplog.records == []  # no policy is warmed there, so none is singled out
