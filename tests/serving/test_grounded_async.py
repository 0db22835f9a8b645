"""Grounded asynchronous execution through the episode service (in-process): a reset with
`async_execution: "grounded"` gives bit for bit the actions of the Policy driven with
act_ahead(grounded=True)/observe in the server's order, and not the naive mode's."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from serving_support import episode_script

from vaops.serving.episode import EpisodeService, InputError
from vaops.serving.sessions import SessionManager
from vaops.serving.websocket import server_metadata

PROMPT = "pick up the cube"
CHUNKS = 3  # chunk 2 is the first computed while a chunk computed ahead executes: the first grounded


def direct(weights, seed: int, script_seed: int, grounded: bool) -> list[np.ndarray]:
    first, keyframes = episode_script(script_seed, CHUNKS)
    policy = weights.new_policy()
    policy.reset(PROMPT, seed=seed)
    chunk, out = policy.act(first), []
    for k in range(CHUNKS):
        ahead = policy.act_ahead(grounded=grounded) if k + 1 < CHUNKS else None
        policy.observe(keyframes[k], chunk.actions)
        out.append(chunk.actions)
        chunk = ahead
    return out


def test_grounded_sessions_run_the_grounded_policy(tiny_weights):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    first, keyframes = episode_script(141, CHUNKS)

    async def scenario(executor):
        svc = EpisodeService(SessionManager(tiny_weights, 2, None, idle_timeout_s=60), executor)
        assert server_metadata("m", svc)["async_modes"] == ["naive", "grounded"]
        s = svc.open()
        with pytest.raises(InputError, match="async_execution must be true or false, got 'eager'; or a mode: "
                                             "'naive', 'grounded'"):
            await svc.reset(s, PROMPT, 41, "test", async_execution="eager")
        await svc.reset(s, PROMPT, 41, "test", async_execution="grounded")
        assert s.async_execution == "grounded"
        out = []
        for k in range(CHUNKS):
            actions, _ = await svc.act(s, first if k == 0 else None, "test")
            await svc.observe(s, keyframes[k], actions, "test")
            out.append(actions)
        await svc.reset(s, PROMPT, 41, "test", async_execution="naive")
        assert s.async_execution is True
        svc.close(s.id)
        return out

    try:
        with ThreadPoolExecutor(1) as executor:
            served = asyncio.run(scenario(executor))
        grounded = direct(tiny_weights, 41, 141, grounded=True)
        naive = direct(tiny_weights, 41, 141, grounded=False)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(served, grounded):
        np.testing.assert_array_equal(got, want)
    # Chunks 0-1 are the same in both modes (chunk 0, executing while chunk 1 is computed, was imagined
    # from the latest observation); chunk 2 is computed after chunk 1's re-imagined video.
    for k in range(2):
        np.testing.assert_array_equal(grounded[k], naive[k])
    assert np.abs(grounded[2] - naive[2]).max() > 1e-4
