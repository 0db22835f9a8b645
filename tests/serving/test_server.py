"""The policy server, live on loopback: kserve's REST and gRPC clients, the upstream websocket
protocol, concurrent episodes identical to the Policy run in-process, clear errors."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from kserve.protocol.infer_type import to_http_parameters
from serving_support import MODEL, ServerProcess, UpstreamClient, direct_episode, episode_script, websocket_episode

from vaops.models.msgpack_numpy import packb

pytestmark = pytest.mark.xdist_group("serve")
PROMPT = "pick up the cube"
CAMERA = "observation.images.top"


def tensor(name: str, array: np.ndarray, datatype: str) -> InferInput:
    t = InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=True)
    return t


def request(op: str, session_id: str | None = None, inputs=(), **params) -> InferRequest:
    params = {"op": op, **params}
    if session_id is not None:
        params["session_id"] = session_id
    return InferRequest(model_name=MODEL, infer_inputs=list(inputs), parameters=params)


async def oip_episode(infer, seed: int, chunks: int, script_seed: int, **reset_params) -> tuple[str, list[np.ndarray]]:
    """An episode over the Open Inference Protocol; `infer` sends one InferRequest."""
    first, keyframes = episode_script(script_seed, chunks)
    prompt = np.array([PROMPT.encode()], dtype=object)
    reply = await infer(request("reset", inputs=[tensor("prompt", prompt, "BYTES")], seed=seed, **reset_params))
    sid = to_http_parameters(reply.parameters)["session_id"]
    out = []
    for k in range(chunks):
        inputs = [tensor(CAMERA, first[CAMERA], "UINT8")] if k == 0 else []
        reply = await infer(request("act", sid, inputs))
        actions = reply.outputs[0].as_numpy()
        stack = np.stack([f[CAMERA] for f in keyframes[k]])
        reply = await infer(request("observe", sid, [tensor(CAMERA, stack, "UINT8"), tensor("actions", actions, "FP32")]))
        assert to_http_parameters(reply.parameters)["frame_offset"] == 2 * (k + 1)
        out.append(actions)
    return sid, out


def test_health_metadata_and_metrics(server):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready").status_code == 200
    meta = httpx.get(f"{server.url}/v2/models/{MODEL}").json()
    assert {"name": CAMERA, "datatype": "UINT8", "shape": [-1, -1, 3]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "actions", "datatype": "FP32", "shape": [14, 2, 16]}]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "vaops_session_capacity 10.0" in metrics
    assert "vaops_kv_cache_bytes" in metrics and "vaops_episode_op_seconds" in metrics
    # nobody may unload the served model
    assert httpx.post(f"{server.url}/v2/repository/models/{MODEL}/unload").status_code == 403
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelUnload(grpc_predict_v2_pb2.RepositoryModelUnloadRequest(model_name=MODEL))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready").status_code == 200


def test_rest_client_episode_matches_policy(server, tiny_weights):
    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        sid, actions = await oip_episode(lambda r: client.infer(server.url, r, model_name=MODEL), 11, 3, 101)
        await client.infer(server.url, request("close", sid), model_name=MODEL)
        with pytest.raises(httpx.HTTPStatusError, match="unknown session") as err:
            await client.infer(server.url, request("act", sid), model_name=MODEL)
        assert err.value.response.status_code == 400
        await client.close()
        return actions

    got = asyncio.run(run())
    want = direct_episode(tiny_weights, PROMPT, 11, 3, 101)
    assert all(g.shape == (14, 2, 16) and g.dtype == np.float32 for g in got)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_grpc_client_episode_matches_policy(server, tiny_weights):
    async def run():
        async with InferenceGRPCClient(server.grpc_url, timeout=60, retries=0) as client:
            sid, actions = await oip_episode(client.infer, 12, 2, 102)
            imagined = await client.infer(request("act", sid, imagine=True))
            video = {o.name: o.as_numpy() for o in imagined.outputs}["imagined"]
            await client.infer(request("close", sid))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.infer(request("act", sid))
            return actions, video, err.value

    got, video, error = asyncio.run(run())
    for g, w in zip(got, direct_episode(tiny_weights, PROMPT, 12, 2, 102)):
        np.testing.assert_array_equal(g, w)
    assert video.dtype == np.uint8 and video.shape == (5, 64, 96, 3)  # 1 + 4 frames from 2 latent frames
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown session" in error.details()


def test_upstream_websocket_client(server, tiny_weights):
    client = UpstreamClient(server.ws_url)
    try:
        assert client.metadata["cameras"] == {CAMERA: [64, 96]}
        assert client.metadata["action_channels"] == 14 and client.metadata["frame_chunk_size"] == 2
        got = websocket_episode(client, PROMPT, 13, 3, 103)
        reply = client.infer({"obs": {CAMERA: np.zeros((64, 96, 3), np.uint8)}, "prompt": PROMPT, "imagine": True})
        assert reply["imagined"].shape == (5, 64, 96, 3) and reply["action"].shape == (14, 2, 16)
        # a new episode on the same connection starts from scratch: same seed, same actions
        again = websocket_episode(client, PROMPT, 13, 3, 103)
    finally:
        client.close()
    want = direct_episode(tiny_weights, PROMPT, 13, 3, 103)
    for g, a, w in zip(got, again, want):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(a, w)
    assert got[0][:, 0, :].max() < 1e-4  # the first chunk's first frame is the (zero) initial action


def test_eight_concurrent_episodes_identical_to_policy(server, tiny_weights):
    seeds = list(range(20, 28))

    def one(seed: int) -> list[np.ndarray]:
        client = UpstreamClient(server.ws_url)
        try:
            return websocket_episode(client, PROMPT, seed, 2, 200 + seed)
        finally:
            client.close()

    waited = metric(httpx.get(f"{server.url}/metrics").text, "vaops_compute_wait_seconds_count")
    with ThreadPoolExecutor(len(seeds)) as pool:
        results = list(pool.map(one, seeds))
    for seed, got in zip(seeds, results):
        for g, w in zip(got, direct_episode(tiny_weights, PROMPT, seed, 2, 200 + seed)):
            np.testing.assert_array_equal(g, w)
    assert not np.array_equal(results[0][1], results[1][1])  # different seeds, different episodes
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'vaops_episode_op_seconds_count{op="act",protocol="websocket"}' in metrics
    # the shared server computes 2 operations at once; every operation reported its wait for a thread
    assert metric(metrics, "vaops_compute_threads") == 2
    for _ in range(50):  # all answered: nothing left on the compute threads (a chunk computed ahead ends soon)
        if metric(metrics, "vaops_compute_in_flight") == 0:
            break
        time.sleep(0.1)
        metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, "vaops_compute_in_flight") == 0
    # each episode computed a reset, 2 acts and 2 observes (and any chunk computed ahead besides)
    assert metric(metrics, "vaops_compute_wait_seconds_count") - waited >= 8 * 5


def metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_bad_requests_get_clear_errors_and_leave_the_session_intact(server, tiny_weights):
    client = UpstreamClient(server.ws_url)
    first, keyframes = episode_script(104, 2)
    try:
        with pytest.raises(RuntimeError, match="send {reset: true, prompt} first"):
            client.infer({"obs": first, "prompt": PROMPT})
        client.infer({"reset": True, "prompt": PROMPT, "seed": 14})
        with pytest.raises(RuntimeError, match="observe before the first act"):
            client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": np.zeros((14, 2, 16), np.float32)})
        with pytest.raises(RuntimeError, match="expected dtype uint8, got float32"):
            client.infer({"obs": {CAMERA: first[CAMERA].astype(np.float32)}})
        with pytest.raises(RuntimeError, match=r"lacks camera\(s\) \['observation.images.top'\]"):
            client.infer({"obs": {"observation.images.cam_high": first[CAMERA]}})
        actions = client.infer({"obs": first, "prompt": PROMPT})["action"]
        with pytest.raises(RuntimeError, match="got 3 keyframes, expected 4"):
            client.infer({"obs": keyframes[0][:3], "compute_kv_cache": True, "state": actions})
        with pytest.raises(RuntimeError, match="NaN or infinity"):
            client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": np.full_like(actions, np.nan)})
        with pytest.raises(RuntimeError, match=r"expected shape \[14, F, 16\]"):
            client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": actions[:5]})
        # none of that moved the episode: it continues exactly as an undisturbed one
        client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": actions})
        second = client.infer({"obs": first, "prompt": PROMPT})["action"]
    finally:
        client.close()
    want = direct_episode(tiny_weights, PROMPT, 14, 2, 104)
    np.testing.assert_array_equal(actions, want[0])
    np.testing.assert_array_equal(second, want[1])


def test_session_limit_gives_a_clear_error(server):
    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        prompt = tensor("prompt", np.array([b"x"], dtype=object), "BYTES")
        opened, error = [], None
        for _ in range(12):
            try:
                reply = await client.infer(server.url, request("reset", inputs=[prompt]), model_name=MODEL)
                opened.append(to_http_parameters(reply.parameters)["session_id"])
            except httpx.HTTPStatusError as e:
                error = e
                break
        for sid in opened:
            await client.infer(server.url, request("close", sid), model_name=MODEL)
        reply = await client.infer(server.url, request("reset", inputs=[prompt]), model_name=MODEL)
        await client.infer(server.url, request("close", to_http_parameters(reply.parameters)["session_id"]),
                           model_name=MODEL)
        await client.close()
        return opened, error

    opened, error = asyncio.run(run())
    assert error is not None and 1 <= len(opened) <= 10
    assert error.response.status_code == 429 and int(error.response.headers["retry-after"]) >= 1
    assert "all 10 sessions are in use" in error.response.json()["error"]


def _garbage(rng: np.random.Generator, i: int, valid: list[bytes]):
    """One hostile websocket message: raw noise, damaged valid messages, wrong structures, bad arrays."""
    kind = i % 6
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 3000)))
    if kind == 1:
        msg = bytearray(valid[i % len(valid)])
        cut = int(rng.integers(1, len(msg)))
        if i % 2:
            return bytes(msg[:cut])
        msg[cut] ^= 0xFF
        return bytes(msg)
    if kind == 2:
        def value(depth):
            pick = int(rng.integers(0, 7 if depth < 4 else 4))
            return [lambda: int(rng.integers(-2**40, 2**40)), lambda: rng.bytes(5), lambda: "x" * int(rng.integers(0, 9)),
                    lambda: None, lambda: [value(depth + 1) for _ in range(3)],
                    lambda: {k: value(depth + 1) for k in ("obs", "reset", "state", "prompt", "compute_kv_cache")},
                    lambda: {b"__ndarray__": True, b"data": rng.bytes(4), b"dtype": "<f4", b"shape": [1]}][pick]()
        return packb(value(0))
    if kind == 3:
        dtype = ["|O", "<U4", "|V8", "|S3", "abc", "<c8", "<f4", "|u1"][i % 8]
        shape = [[-1, 3], [10**9, 10**9], [64, 96, 3], [2, 2], "x"][i % 5]
        array = {b"__ndarray__": True, b"data": rng.bytes(64), b"dtype": dtype, b"shape": shape}
        return packb({"obs": {CAMERA: array}, "prompt": "x"} if i % 2 else
                     {"obs": [{CAMERA: array}], "compute_kv_cache": True, "state": array})
    if kind == 4:
        return packb([{"reset": True, "prompt": 17}, {"obs": [1, 2], "prompt": "x"}, {"compute_kv_cache": True, "state": "s"},
                      {"obs": {CAMERA: np.zeros((64, 96, 3), np.float64)}}, {"reset": True, "seed": -5},
                      {"compute_kv_cache": True, "obs": {}, "state": np.zeros((14, 9, 16), np.float32)}][i % 6])
    return "not msgpack"


def test_fuzzed_garbage_never_takes_the_server_down(server, tiny_weights):
    rng = np.random.default_rng(0)
    first, keyframes = episode_script(105, 2)
    victim = UpstreamClient(server.ws_url)  # an episode in progress while the fuzzing runs
    victim.infer({"reset": True, "prompt": PROMPT, "seed": 15})
    actions = victim.infer({"obs": first, "prompt": PROMPT})["action"]
    valid = [packb({"reset": True, "prompt": PROMPT}), packb({"obs": first, "prompt": PROMPT}),
             packb({"obs": keyframes[0], "compute_kv_cache": True, "state": actions})]
    fuzzer = UpstreamClient(server.ws_url)
    errors = 0
    try:
        for i in range(240):
            message = _garbage(rng, i, valid)
            fuzzer.ws.send(message)
            errors += isinstance(fuzzer.ws.recv(timeout=30), str)
        assert errors >= 200  # nearly everything was refused, with a text reply each time
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(60):
                body = rng.bytes(int(rng.integers(0, 500))) if i % 3 == 0 else (
                    b'{"inputs": [{"name": "prompt", "shape": [%d], "datatype": "%s", "data": [1, 2]}], '
                    b'"parameters": {"op": "%s"}}' % (i - 30, [b"BYTES", b"FP32", b"UINT8"][i % 3],
                                                      [b"reset", b"act", b"observe", b"nope"][i % 4]))
                reply = http.post(f"/v2/models/{MODEL}/infer", content=body,
                                  headers={"content-type": "application/json"})
                assert 400 <= reply.status_code < 500, reply.text  # bad input is never a server error
        victim.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": actions})
        second = victim.infer({"obs": first, "prompt": PROMPT})["action"]
        assert fuzzer.infer({"reset": True, "prompt": PROMPT}) == {}  # the fuzzed connection still works
        # no session leaked: just the victim's and the fuzzer's
        assert "vaops_sessions 2.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        victim.close()
        fuzzer.close()
    want = direct_episode(tiny_weights, PROMPT, 15, 2, 105)
    np.testing.assert_array_equal(actions, want[0])
    np.testing.assert_array_equal(second, want[1])
    assert server.alive() and httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_the_compute_threads_are_all_started_before_the_server_is_ready(tiny_weights):
    """Each thread makes its first library calls at start-up (on a GPU: its cuBLAS and cuDNN handles), not in a
    robot's first operations; a CPU server computes one operation at a time unless told otherwise."""
    from vaops.serving.config import ServeConfig
    from vaops.serving.server import model_from_weights

    for threads, ahead, expected in ((None, None, (1, 0)), (3, None, (3, 0)), (2, 2, (2, 2))):
        model = model_from_weights(ServeConfig(model="(in memory)", compute_threads=threads, ahead_threads=ahead,
                                               defer_observations=ahead is None), tiny_weights)
        pools = [model.episodes.executor, model.episodes.ahead_executor]
        try:
            assert model.episodes.defer_observations is (ahead is None)  # --no-defer-observations reaches the service
            assert [0 if p is None else len(p._threads) for p in pools] == list(expected)
            assert all(t.is_alive() for p in pools if p is not None for t in p._threads)
        finally:
            for p in pools:
                if p is not None:
                    p.shutdown()


def test_a_batching_server_batches_robots_action_steps_and_each_gets_its_own_episode(tiny_checkpoint, tiny_weights,
                                                                                     tmp_path):
    """`vaops serve --max-batch 4` (the default on a GPU): 4 robots' episodes at once, synchronous and asynchronous,
    through the upstream protocol; their action steps share batches (the server's metric counts them) and each
    robot's actions equal its episode run in-process alone, up to the GEMMs' rounding at another batch size."""
    proc = ServerProcess(str(tiny_checkpoint), tmp_path, tmp_path / "server.log", "--max-sessions", "4",
                         "--torch-threads", "1", "--compute-threads", "4", "--max-batch", "4",
                         "--batch-wait-ms", "300").wait_ready()
    try:
        runs = [(40 + r, r % 2 == 1) for r in range(4)]  # (seed, asynchronous)

        def one(run: tuple[int, bool]) -> list[np.ndarray]:
            client = UpstreamClient(proc.ws_url)
            try:
                return websocket_episode(client, PROMPT, run[0], 3, 300 + run[0], async_execution=run[1])
            finally:
                client.close()

        with ThreadPoolExecutor(len(runs)) as pool:
            results = list(pool.map(one, runs))
        metrics = httpx.get(f"{proc.url}/metrics").text
    finally:
        proc.stop()
    for (seed, async_execution), got in zip(runs, results):
        want = direct_episode(tiny_weights, PROMPT, seed, 3, 300 + seed, async_execution=async_execution)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)
    sizes = {int(line.split('size="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1])
             for line in metrics.splitlines() if line.startswith("vaops_action_batches_total{")}
    assert sum(n * count for n, count in sizes.items()) >= 4 * 3  # every chunk's action steps, batched or not
    assert any(n > 1 for n in sizes), sizes  # robots shared batches


def test_sigterm_lets_the_episodes_under_way_finish_and_starts_no_new_one(tiny_checkpoint, tmp_path):
    """A rolling update's SIGTERM: the server reports not ready at once and refuses new sessions and episodes
    (503 with Retry-After, an error text on the websocket), the robot mid-episode finishes its chunks, and the
    server stops once that episode has ended, not at the drain timeout."""
    srv = ServerProcess(str(tiny_checkpoint), tmp_path, tmp_path / "server.log", "--torch-threads", "1",
                        "--no-grpc", "--drain-timeout", "60").wait_ready()
    try:
        drain_one_episode(srv)
    finally:
        srv.stop()  # at once (SIGINT), also where an assertion failed mid-drain
    log = srv.log.read_text()
    assert "stopping: 2 episode(s) under way may finish within 60 s" in log
    assert "stopping: the episodes under way have ended" in log


def drain_one_episode(srv: ServerProcess) -> None:
    """A websocket robot and a REST robot mid-episode when SIGTERM comes: both finish, nothing new starts, and the
    server then stops."""
    import signal

    robot = UpstreamClient(srv.ws_url)
    try:
        first, keyframes = episode_script(105, 3)
        assert robot.infer({"reset": True, "prompt": PROMPT, "seed": 15}) == {}
        actions = robot.infer({"obs": first, "prompt": PROMPT})["action"]  # chunk 0 out: an episode under way
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))  # and one over REST
        loop = asyncio.new_event_loop()  # the client's connections live in one loop

        def call(req):
            return loop.run_until_complete(rest.infer(srv.url, req, model_name=MODEL))

        prompt = tensor("prompt", np.array([PROMPT.encode()], dtype=object), "BYTES")
        sid = to_http_parameters(call(request("reset", inputs=[prompt])).parameters)["session_id"]
        rest_actions = call(request("act", sid, [tensor(CAMERA, first[CAMERA], "UINT8")])).outputs[0].as_numpy()
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{srv.url}/v2/models/{MODEL}/ready").status_code == 503
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert metric(metrics, "vaops_draining") == 1 and metric(metrics, "vaops_episodes_under_way") == 2
        reply = httpx.post(f"{srv.url}/v2/models/{MODEL}/infer", json={
            "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "parameters": {"op": "reset"}})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert "this server is stopping" in reply.json()["error"]
        late = UpstreamClient(srv.ws_url)
        try:
            with pytest.raises(RuntimeError, match="this server is stopping: it finishes the episodes under way"):
                late.infer({"reset": True, "prompt": PROMPT})
        finally:
            late.close()
        for k in range(3):  # the robot under way goes on to the end of its episode
            assert robot.infer({"obs": keyframes[k], "compute_kv_cache": True, "state": actions}) == {}
            if k < 2:
                actions = robot.infer({"obs": first, "prompt": PROMPT})["action"]
                assert actions.shape == (14, 2, 16)
        with pytest.raises(RuntimeError, match="this server is stopping"):  # but starts no new one
            robot.infer({"reset": True, "prompt": PROMPT})
        stack = np.stack([f[CAMERA] for f in keyframes[0]])  # the REST robot too, to its close
        call(request("observe", sid, [tensor(CAMERA, stack, "UINT8"), tensor("actions", rest_actions, "FP32")]))
        assert call(request("act", sid)).outputs[0].as_numpy().shape == (14, 2, 16)
        call(request("close", sid))
        loop.run_until_complete(rest.close())
        loop.close()
        assert srv.alive()
    finally:
        robot.close()
    srv.proc.wait(timeout=20)  # the episode has ended (2 s quiet): the server stops long before its 60 s


@pytest.mark.parametrize("drain, second", [("1", None), ("60", "SIGTERM"), ("60", "SIGINT")])
def test_a_drain_ends_at_its_timeout_or_at_the_next_signal(tiny_checkpoint, tmp_path, drain, second):
    """An episode that never ends holds a stopping server for --drain-timeout at most; a second SIGTERM, or a
    SIGINT, stops it at once."""
    import signal

    srv = ServerProcess(str(tiny_checkpoint), tmp_path, tmp_path / "server.log", "--torch-threads", "1",
                        "--no-grpc", "--drain-timeout", drain).wait_ready()
    robot = UpstreamClient(srv.ws_url)
    try:
        first, _ = episode_script(106, 1)
        robot.infer({"reset": True, "prompt": PROMPT, "seed": 16})
        robot.infer({"obs": first, "prompt": PROMPT})  # a chunk out, never observed
        srv.proc.send_signal(signal.SIGTERM)
        if second is not None:
            deadline = time.monotonic() + 10  # the drain has begun: not ready
            while httpx.get(f"{srv.url}/v2/health/ready").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            srv.proc.send_signal(getattr(signal, second))
        srv.proc.wait(timeout=15)
    finally:
        robot.close()
        srv.stop()  # at once (SIGINT), also where an assertion failed first
    log = srv.log.read_text()
    assert "stopping: 1 episode(s) under way may finish within" in log
    assert ("stopping: 1 episode(s) still under way after 1 s" in log) == (second is None)
