"""Asynchronous execution: the server computes each next chunk while the robot executes the current
one. Through the live server (websocket, REST, gRPC) an episode gives bit for bit the actions of the
Policy driven with act_ahead/observe in the same order; misuse is refused and changes nothing; a
failed, reset, closed or expired chunk computed ahead is dealt with cleanly (in-process service)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from serving_support import MODEL, UpstreamClient, direct_episode, episode_script, websocket_episode
from test_server import oip_episode, request

from vaops.serving.episode import AheadFailed, EpisodeService
from vaops.serving.sessions import Conflict, SessionManager

pytestmark = pytest.mark.xdist_group("serve")
PROMPT = "pick up the cube"


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_websocket_async_episode_matches_policy(server, tiny_weights):
    client = UpstreamClient(server.ws_url)
    try:
        assert client.metadata["async_execution"] is True
        got = websocket_episode(client, PROMPT, 31, 4, 131, async_execution=True)
        # the same connection back to the synchronous loop: a reset without the flag
        sync = websocket_episode(client, PROMPT, 31, 3, 131)
    finally:
        client.close()
    assert_same(got, direct_episode(tiny_weights, PROMPT, 31, 4, 131, async_execution=True))
    assert_same(sync, direct_episode(tiny_weights, PROMPT, 31, 3, 131))
    np.testing.assert_array_equal(got[0], sync[0])  # the first chunk is the same either way
    assert not np.array_equal(got[1], sync[1])  # later ones come from the imagined, then grounded, chunk


def test_rest_and_grpc_async_episodes_match_policy(server, tiny_weights):
    async def run():
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        sid, over_rest = await oip_episode(lambda r: rest.infer(server.url, r, model_name=MODEL), 32, 3, 132,
                                           async_execution=True)
        await rest.infer(server.url, request("close", sid), model_name=MODEL)
        await rest.close()
        async with InferenceGRPCClient(server.grpc_url, timeout=60, retries=0) as grpc_client:
            sid, over_grpc = await oip_episode(grpc_client.infer, 33, 2, 133, async_execution=True)
            await grpc_client.infer(request("close", sid))
        return over_rest, over_grpc

    over_rest, over_grpc = asyncio.run(run())
    assert_same(over_rest, direct_episode(tiny_weights, PROMPT, 32, 3, 132, async_execution=True))
    assert_same(over_grpc, direct_episode(tiny_weights, PROMPT, 33, 2, 133, async_execution=True))


def test_async_misuse_is_refused_and_changes_nothing(server, tiny_weights):
    first, keyframes = episode_script(134, 3)
    client = UpstreamClient(server.ws_url)
    try:
        with pytest.raises(RuntimeError, match="async_execution must be true or false, got 'yes'"):
            client.infer({"reset": True, "prompt": PROMPT, "async_execution": "yes"})
        client.infer({"reset": True, "prompt": PROMPT, "seed": 34, "async_execution": True})
        with pytest.raises(RuntimeError, match="observe before the first act"):
            client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": np.zeros((14, 2, 16), np.float32)})
        a0 = client.infer({"obs": first, "prompt": PROMPT})["action"]
        with pytest.raises(RuntimeError, match="send this chunk's observation"):
            client.infer({"obs": first, "prompt": PROMPT})
        with pytest.raises(RuntimeError, match="asynchronous execution observes whole chunks of 2 latent frames"):
            client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": a0[:, :1]})
        with pytest.raises(RuntimeError, match="got 8 keyframes, expected 4"):
            client.infer({"obs": keyframes[1], "compute_kv_cache": True, "state": a0})
        assert client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": a0}) == {}
        with pytest.raises(RuntimeError, match="this chunk was observed already"):
            client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": a0})
        a1 = client.infer({"obs": first, "prompt": PROMPT})["action"]
        client.infer({"obs": keyframes[1], "compute_kv_cache": True, "state": a1})
        a2 = client.infer({"obs": first, "prompt": PROMPT})["action"]
        # a reset while the next chunk is computed ahead: the new episode starts from scratch
        again = websocket_episode(client, PROMPT, 34, 3, 134, async_execution=True)
    finally:
        client.close()
    want = direct_episode(tiny_weights, PROMPT, 34, 3, 134, async_execution=True)
    assert_same([a0, a1, a2], want)
    assert_same(again, want)
    assert server.alive() and httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_closing_mid_computation_frees_the_session(server):
    first, _ = episode_script(135, 1)
    for _ in range(3):  # each connection leaves while its chunk ahead is computing
        client = UpstreamClient(server.ws_url)
        client.infer({"reset": True, "prompt": PROMPT, "async_execution": True})
        client.infer({"obs": first, "prompt": PROMPT})
        client.close()
    deadline = time.monotonic() + 30
    while "vaops_sessions 0.0" not in httpx.get(f"{server.url}/metrics").text:
        assert time.monotonic() < deadline, "sessions left open after their connections closed"
        time.sleep(0.1)
    assert server.alive()


# ----- in-process: the service's handling of the chunk computed ahead -----

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def gated(policy) -> threading.Event:
    """Make this policy's chunks ahead wait for the returned event (as a slow GPU would)."""
    gate = threading.Event()
    compute = policy.act_ahead

    def act_ahead():
        gate.wait(30)
        return compute()

    policy.act_ahead = act_ahead
    return gate


@pytest.fixture
def service(tiny_weights):
    clock = Clock()
    with ThreadPoolExecutor(1) as executor:
        yield EpisodeService(SessionManager(tiny_weights, 3, None, idle_timeout_s=60, clock=clock), executor), clock


async def until(predicate) -> None:
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_failed_chunk_ahead_surfaces_on_the_next_request(service, tiny_weights):
    svc, _ = service
    first, keyframes = episode_script(136, 3)

    async def scenario():
        s = svc.open()
        await svc.reset(s, PROMPT, 36, "test", async_execution=True)

        def broken():
            raise RuntimeError("device lost")

        s.policy.act_ahead = broken
        await svc.act(s, first, "test")
        with pytest.raises(AheadFailed, match="the chunk computed ahead failed: RuntimeError: device lost"):
            await svc.observe(s, keyframes[0], np.zeros((14, 2, 16), np.float32), "test")
        with pytest.raises(Conflict, match="device lost.*send a reset"):  # until a reset
            await svc.act(s, None, "test")
        del s.policy.act_ahead
        await svc.reset(s, PROMPT, 36, "test", async_execution=True)
        out = []
        for k in range(3):
            actions, _ = await svc.act(s, first if k == 0 else None, "test")
            await svc.observe(s, keyframes[k], actions, "test")
            out.append(actions)
        svc.close(s.id)
        return out

    assert_same(asyncio.run(scenario()), direct_episode(tiny_weights, PROMPT, 36, 3, 136, async_execution=True))


def test_reset_close_and_expiry_wait_for_or_cancel_the_chunk_ahead(service):
    svc, clock = service
    first, keyframes = episode_script(137, 1)

    async def scenario():
        loop = asyncio.get_running_loop()
        a = svc.open("a")
        await svc.reset(a, PROMPT, 37, "test", async_execution=True)
        gate = gated(a.policy)
        await svc.act(a, first, "test")
        await until(a.ahead.running)
        # running: idle expiry passes it by, a reset waits for it
        clock.now += 100
        assert svc.sessions.expire_idle() == [] and a.busy
        loop.call_later(0.2, gate.set)
        start = time.perf_counter()
        await svc.reset(a, PROMPT, 37, "test", async_execution=True)
        assert time.perf_counter() - start >= 0.15 and a.ahead is None and a.policy.engine.ahead is None
        # done: an idle session expires, its policy goes back to the pool
        gate.clear()
        await svc.act(a, first, "test")
        gate.set()
        await until(lambda: not a.busy)
        clock.now += 100
        assert svc.sessions.expire_idle() == ["a"]
        assert svc.open("b").policy is a.policy
        # closed while running: the policy is handed out again only once the chunk is done
        c = svc.open("c")
        await svc.reset(c, PROMPT, 37, "test", async_execution=True)
        gate = gated(c.policy)
        await svc.act(c, first, "test")
        await until(c.ahead.running)
        svc.close("c")
        assert svc.open("d").policy is not c.policy
        svc.close("d")
        gate.set()
        await until(lambda: c.policy in svc.sessions._pool)
        # not started yet (the worker is busy elsewhere): closing cancels it
        e = svc.open("e")
        await svc.reset(e, PROMPT, 37, "test", async_execution=True)
        actions, _ = await svc.act(e, first, "test")
        await svc.observe(e, keyframes[0], actions, "test")
        blocker = threading.Event()
        svc.executor.submit(blocker.wait, 30)
        await svc.act(e, None, "test")  # hands out the chunk computed ahead; the next one waits for the worker
        assert e.busy
        svc.close("e")
        assert e.ahead.cancelled() and not e.busy and e.policy in svc.sessions._pool
        blocker.set()
        return len(svc.sessions)

    assert asyncio.run(scenario()) == 1  # b


def test_the_imagined_video_does_not_wait_for_the_chunk_ahead(service, tiny_weights):
    """With one compute thread, the reply's imagined video is decoded before the next chunk starts, so
    asking for it does not make the robot wait for a whole chunk more; the actions stay the same."""
    svc, _ = service
    first, keyframes = episode_script(138, 3)
    order = []

    async def scenario():
        s = svc.open()
        await svc.reset(s, PROMPT, 38, "test", async_execution=True)
        act_ahead, imagine = s.policy.act_ahead, s.policy.imagine
        s.policy.act_ahead = lambda: order.append("ahead") or act_ahead()
        s.policy.imagine = lambda latents: order.append("imagine") or imagine(latents)
        out = []
        for k in range(3):
            actions, video = await svc.act(s, first if k == 0 else None, "test", imagine=True)
            assert video is not None and video.dtype == np.uint8
            await svc.observe(s, keyframes[k], actions, "test")
            out.append(actions)
        svc.close(s.id)
        return out

    got = asyncio.run(scenario())
    assert order == ["imagine", "ahead"] * 3
    assert_same(got, direct_episode(tiny_weights, PROMPT, 38, 3, 138, async_execution=True))


def test_chunks_ahead_on_threads_of_their_own_leave_the_robots_requests_a_thread(tiny_weights):
    """With `ahead_threads` the chunks computed ahead run on a pool of their own: while another robot's chunk
    ahead holds that pool's only thread (a slow GPU), a robot's reset, first act and observation still run on
    the compute thread; its own chunk ahead waits its turn, and the episode gives the Policy's actions."""
    first, keyframes = episode_script(139, 2)
    threads: list[str] = []

    async def scenario(svc):
        a = svc.open("a")
        await svc.reset(a, PROMPT, 39, "test", async_execution=True)
        gate = gated(a.policy)
        await svc.act(a, first, "test")
        await until(a.ahead.running)  # the ahead pool's one thread is held
        b = svc.open("b")
        await svc.reset(b, PROMPT, 40, "test", async_execution=True)
        act_ahead = b.policy.act_ahead
        b.policy.act_ahead = lambda: threads.append(threading.current_thread().name) or act_ahead()
        out = [(await svc.act(b, first, "test"))[0]]
        assert not b.ahead.running() and not b.ahead.done()  # queued behind a's
        gate.set()
        await svc.observe(b, keyframes[0], out[0], "test")
        out.append((await svc.act(b, None, "test"))[0])
        await svc.observe(b, keyframes[1], out[1], "test")
        for s in ("a", "b"):
            svc.close(s)
        return out

    with ThreadPoolExecutor(1, thread_name_prefix="policy") as compute, \
            ThreadPoolExecutor(1, thread_name_prefix="ahead") as ahead:
        svc = EpisodeService(SessionManager(tiny_weights, 3, None, idle_timeout_s=60), compute, ahead)
        got = asyncio.run(asyncio.wait_for(scenario(svc), 120))
    assert threads and all(name.startswith("ahead") for name in threads)
    assert_same(got, direct_episode(tiny_weights, PROMPT, 40, 2, 139, async_execution=True))


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "observed-before-reply"])
def test_an_observation_is_acknowledged_at_once_and_observed_by_the_next_chunk_ahead(service, tiny_weights, defer):
    """In asynchronous execution the robot's next chunk was computed before its observation, so the observation is
    checked and answered at once and the policy observes it first thing in the next chunk computed ahead: the
    same operations in the same order (the Policy's actions), off the robot's round trip. The last one of an
    episode is then never computed (nothing reads it)."""
    svc, _ = service
    svc.defer_observations = defer
    first, keyframes = episode_script(141, 3)
    log: list[str] = []

    async def scenario():
        s = svc.open()
        await svc.reset(s, PROMPT, 41, "test", async_execution=True)
        observe, observe_ahead, act_ahead = s.policy.observe, s.policy.observe_ahead, s.policy.act_ahead
        s.policy.observe = lambda *a: log.append("observe") or observe(*a)
        # deferred, on the stream of chunks computed ahead (on a GPU: below the robots' requests)
        s.policy.observe_ahead = lambda *a: log.append("observe ahead") or observe_ahead(*a)
        s.policy.act_ahead = lambda: log.append("ahead") or act_ahead()
        out = []
        for k in range(3):
            actions, _ = await svc.act(s, first if k == 0 else None, "test")
            await until(s.ahead.done)
            log.append("act")
            await svc.observe(s, keyframes[k], actions, "test")
            log.append("observed")
            out.append(actions)
        svc.close(s.id)
        return out

    got = asyncio.run(scenario())
    if defer:
        assert log == ["ahead", "act", "observed", "observe ahead", "ahead", "act", "observed", "observe ahead",
                       "ahead", "act", "observed"]
    else:
        assert log == ["ahead", "act", "observe", "observed"] * 3
    assert_same(got, direct_episode(tiny_weights, PROMPT, 41, 3, 141, async_execution=True))


def test_an_observation_reports_how_long_it_waited_for_the_chunk_computed_ahead(service):
    """vaops_ahead_wait_seconds: a robot's wait between chunks where the server falls behind. A chunk ahead held back
    0.3 s shows in the observation that waits for it; one already done when the observation comes counts ~0."""
    from prometheus_client import REGISTRY

    svc, _ = service
    first, keyframes = episode_script(143, 3)

    def waits() -> tuple[float, float]:
        return (REGISTRY.get_sample_value("vaops_ahead_wait_seconds_count"),
                REGISTRY.get_sample_value("vaops_ahead_wait_seconds_sum"))

    async def scenario():
        s = svc.open()
        await svc.reset(s, PROMPT, 43, "test", async_execution=True)
        act_ahead = s.policy.act_ahead
        s.policy.act_ahead = lambda: time.sleep(0.3) or act_ahead()
        before = waits()
        actions, _ = await svc.act(s, first, "test")
        await svc.observe(s, keyframes[0], actions, "test")  # waits for the chunk ahead, held back 0.3 s
        slow = waits()
        actions, _ = await svc.act(s, None, "test")
        await until(s.ahead.done)
        await svc.observe(s, keyframes[1], actions, "test")  # its chunk ahead was done already
        done = waits()
        svc.close(s.id)
        return before, slow, done

    before, slow, done = asyncio.run(scenario())
    assert slow[0] == before[0] + 1 and slow[1] - before[1] >= 0.2
    assert done[0] == slow[0] + 1 and done[1] - slow[1] < slow[1] - before[1]


def test_a_deferred_observation_that_fails_stops_the_episode_with_its_cause(service):
    svc, _ = service
    first, keyframes = episode_script(142, 2)

    async def scenario():
        s = svc.open()
        await svc.reset(s, PROMPT, 42, "test", async_execution=True)

        def broken(*_):
            raise RuntimeError("device lost")

        actions, _ = await svc.act(s, first, "test")
        await svc.observe(s, keyframes[0], actions, "test")  # acknowledged: observed with the next chunk ahead
        s.policy.observe_ahead = broken
        await svc.act(s, None, "test")
        await until(s.ahead.done)
        with pytest.raises(AheadFailed, match="observing the last chunk failed: RuntimeError: device lost"):
            await svc.observe(s, keyframes[1], actions, "test")
        with pytest.raises(Conflict, match="device lost.*send a reset"):
            await svc.act(s, None, "test")
        svc.close(s.id)

    asyncio.run(scenario())
