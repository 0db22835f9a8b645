"""bench/concurrent_chunks.py's harness: at most `concurrency` operations in flight, every robot's chunks
counted, and the same actions whatever the concurrency (what its in-run check compares on a GPU)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from concurrent_chunks import fleet  # noqa: E402
from serve import PROMPT, episode_frames  # noqa: E402

from vaops.models.checkpoint import build_random_weights  # noqa: E402
from vaops.models.config import get_preset  # noqa: E402
from vaops.models.policy import allow_concurrent_policies  # noqa: E402


def test_fleet_keeps_its_operations_in_flight_bounded_and_each_robots_chunks_unchanged():
    weights = build_random_weights(get_preset("tiny"), seed=0)
    allow_concurrent_policies()
    policies = [weights.new_policy() for _ in range(3)]
    in_flight, peak = [0], [0]
    lock = threading.Lock()
    for p in policies:  # count the acts and observes running at once
        for name in ("act", "observe"):
            inner = getattr(p, name)

            def counted(*args, _inner=inner):
                with lock:
                    in_flight[0] += 1
                    peak[0] = max(peak[0], in_flight[0])
                time.sleep(0.01)  # long enough for the other robots' threads to try to enter
                try:
                    return _inner(*args)
                finally:
                    with lock:
                        in_flight[0] -= 1

            setattr(p, name, counted)
    one = fleet(policies, 2, "paper", 1, seed0=0)
    assert peak[0] == 1
    peak[0] = 0
    two = fleet(policies, 2, "paper", 2, seed0=0)
    assert peak[0] == 2
    assert len(one["latency"]["act"]) == len(two["latency"]["observe"]) == 6
    assert one["chunks_per_s"] > 0 and two["chunks_per_s"] > 0
    assert not np.allclose(one["actions"][0][0], one["actions"][1][0])  # robots differ: a mix-up would show
    for a, b in zip(one["actions"], two["actions"]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_an_asynchronous_fleet_gives_each_robot_the_chunks_of_its_episode_alone():
    """With --async-execution each robot computes its chunks ahead of their observations, as a served session
    in asynchronous execution does; its actions are those of its episode run alone through the Policy."""
    weights = build_random_weights(get_preset("tiny"), seed=0)
    allow_concurrent_policies()
    policies = [weights.new_policy() for _ in range(2)]
    got = fleet(policies, 3, "paper", 2, seed0=0, async_execution=True)
    assert len(got["latency"]["act"]) == len(got["latency"]["observe"]) == 6
    for r, robot in enumerate(got["actions"]):
        alone = weights.new_policy()
        first, keyframes = episode_frames(alone.preset, r, 3)
        alone.reset(PROMPT, seed=r, operating_point="paper")
        executing = alone.act(first)
        want = [executing.actions]
        for k in range(1, 3):
            ahead = alone.act_ahead()
            alone.observe(keyframes[k - 1], executing.actions)
            want.append(ahead.actions)
            executing = ahead
        assert len(robot) == 3
        for x, y in zip(robot, want):
            np.testing.assert_array_equal(x, y)
