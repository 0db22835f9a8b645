"""Protocol conformance with clients the project did not write: out-of-range numbers are 400 /
INVALID_ARGUMENT naming input, value and range; retries with the same sequence number get the same
answer computed once (a repeat without one is a 409 / ABORTED conflict); a full session table is
429 with Retry-After / RESOURCE_EXHAUSTED; upstream's /healthz; metadata advertises only what works."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from serving_support import MODEL, UpstreamClient, direct_episode, episode_script, websocket_episode
from test_server import CAMERA, PROMPT, request, tensor

from vaops.serving.episode import EpisodeFailed, EpisodeService
from vaops.serving.sessions import Conflict, SessionManager

pytestmark = pytest.mark.xdist_group("serve")


def infer(http: httpx.Client, op: str, session_id: str | None = None, inputs=(), **params) -> httpx.Response:
    """One REST infer request with JSON tensors, as curl or any HTTP client sends it."""
    body: dict[str, Any] = {"inputs": list(inputs), "parameters": {"op": op, **params}}
    if session_id is not None:
        body["parameters"]["session_id"] = session_id
    return http.post(f"/v2/models/{MODEL}/infer", json=body)


def json_tensor(name: str, array: np.ndarray, datatype: str) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}


def prompt_input() -> dict:
    return {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}


def actions_of(reply: httpx.Response) -> np.ndarray:
    out = next(o for o in reply.json()["outputs"] if o["name"] == "actions")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def test_numbers_outside_the_datatype_are_refused_and_the_episode_goes_on(server, tiny_weights):
    first, keyframes = episode_script(140, 1)
    image = first[CAMERA]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert infer(http, "reset", "range", [prompt_input()], seed=40).status_code == 200
        for value, shown in ((300, "300"), (-1, "-1"), (1.5, "1.5")):
            bad = json_tensor(CAMERA, image, "UINT8")
            bad["data"][7] = value
            reply = infer(http, "act", "range", [bad])
            assert reply.status_code == 400, reply.text
            assert reply.json()["error"] == (f"input '{CAMERA}': UINT8 data must be integers in [0, 255], "
                                              f"got {shown}")
        bad_actions = json_tensor("actions", np.zeros((14, 2, 16), np.float32), "FP32")
        bad_actions["data"][0] = 1e39
        stack = np.stack([f[CAMERA] for f in keyframes[0]])
        reply = infer(http, "observe", "range", [json_tensor(CAMERA, stack, "UINT8"), bad_actions])
        assert reply.status_code == 400 and "'actions': FP32 values must be within" in reply.json()["error"]
        # gRPC typed contents: uint_contents are 32-bit, so 300 reaches the server as UINT8 too
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
            contents = pb.InferTensorContents(uint_contents=[300] * image.size)
            message = pb.ModelInferRequest(
                model_name=MODEL, parameters={"op": pb.InferParameter(string_param="act"),
                                              "session_id": pb.InferParameter(string_param="range")},
                inputs=[pb.ModelInferRequest.InferInputTensor(name=CAMERA, datatype="UINT8", shape=list(image.shape),
                                                              contents=contents)])
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(message)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UINT8 data must be integers in [0, 255], got 300" in err.value.details()
        # none of that moved the episode: its first chunk is the undisturbed one
        reply = infer(http, "act", "range", [json_tensor(CAMERA, image, "UINT8")])
        assert reply.status_code == 200
        assert infer(http, "close", "range").status_code == 200
    np.testing.assert_array_equal(actions_of(reply), direct_episode(tiny_weights, PROMPT, 40, 1, 140)[0])


def test_retries_with_a_sequence_number_get_the_same_answer_computed_once(server, tiny_weights):
    first, keyframes = episode_script(141, 3)
    sid = "retry-episode"
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(2):  # a retried reset naming its session: one session, one reset
            reply = infer(http, "reset", sid, [prompt_input()], seed=41, seq=0)
            assert reply.status_code == 200 and reply.json()["parameters"]["seq"] == 0
        got, seq = [], 1
        for k in range(3):
            inputs = [json_tensor(CAMERA, first[CAMERA], "UINT8")] if k == 0 else []
            replies = [infer(http, "act", sid, inputs, seq=seq) for _ in range(2)]
            assert [r.status_code for r in replies] == [200, 200]
            np.testing.assert_array_equal(actions_of(replies[0]), actions_of(replies[1]))
            actions = actions_of(replies[0])
            stack = np.stack([f[CAMERA] for f in keyframes[k]])
            observe = [json_tensor(CAMERA, stack, "UINT8"), json_tensor("actions", actions, "FP32")]
            offsets = [infer(http, "observe", sid, observe, seq=seq + 1).json()["parameters"]["frame_offset"]
                       for _ in range(2)]
            assert offsets == [2 * (k + 1)] * 2  # written once
            got.append(actions)
            seq += 2
        # an older number, or the last number for another op, is a conflict that changes nothing
        stale = infer(http, "act", sid, seq=1)
        assert stale.status_code == 409
        assert "seq 1 is behind this session's last request (seq 6" in stale.json()["error"]
        reused = infer(http, "act", sid, seq=6)
        assert reused.status_code == 409 and "seq 6 was this session's observe" in reused.json()["error"]
        # without numbers a repeated act is refused, not computed twice
        assert infer(http, "act", sid).status_code == 200
        again = infer(http, "act", sid)
        assert again.status_code == 409 and "awaits its observation" in again.json()["error"]
        # closing twice answers twice the same; a session never opened stays unknown
        assert [infer(http, "close", sid, seq=9).status_code for _ in range(2)] == [200, 200]
        unknown = infer(http, "close", "never-opened")
        assert unknown.status_code == 400 and "unknown session 'never-opened'" in unknown.json()["error"]
    want = direct_episode(tiny_weights, PROMPT, 41, 3, 141)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_grpc_and_websocket_repeats(server, tiny_weights):
    first, keyframes = episode_script(142, 1)

    async def grpc_calls():
        async with InferenceGRPCClient(server.grpc_url, timeout=60, retries=0) as client:
            prompt = tensor("prompt", np.array([PROMPT.encode()], dtype=object), "BYTES")
            await client.infer(request("reset", "grpc-repeat", [prompt], seed=42))
            await client.infer(request("act", "grpc-repeat", [tensor(CAMERA, first[CAMERA], "UINT8")]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.infer(request("act", "grpc-repeat"))
            await client.infer(request("close", "grpc-repeat"))
            return err.value

    error = asyncio.run(grpc_calls())
    assert error.code() == grpc.StatusCode.ABORTED and "awaits its observation" in error.details()
    client = UpstreamClient(server.ws_url)
    try:
        assert client.metadata["sequence_numbers"] is True
        assert client.infer({"reset": True, "prompt": PROMPT, "seed": 42, "seq": 0}) == {}
        a = client.infer({"obs": first, "prompt": PROMPT, "seq": 1})["action"]
        b = client.infer({"obs": first, "prompt": PROMPT, "seq": 1})["action"]
        with pytest.raises(RuntimeError, match="seq must be an integer in \\[0, 2\\^63\\), got 'x'"):
            client.infer({"obs": first, "prompt": PROMPT, "seq": "x"})
        for _ in range(2):
            assert client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": a, "seq": 2}) == {}
        with pytest.raises(RuntimeError, match="this chunk was observed already"):
            client.infer({"obs": keyframes[0], "compute_kv_cache": True, "state": a})
    finally:
        client.close()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, direct_episode(tiny_weights, PROMPT, 42, 1, 142)[0])


def test_full_session_table_is_429_and_resource_exhausted(server):
    opened = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        try:
            for i in range(12):
                reply = infer(http, "reset", f"fill-{i}", [prompt_input()])
                if reply.status_code != 200:
                    break
                opened.append(f"fill-{i}")
            assert reply.status_code == 429 and 1 <= len(opened) <= 10
            assert 1 <= int(reply.headers["retry-after"]) <= 600  # the server's idle timeout is 600 s
            assert "all 10 sessions are in use" in reply.json()["error"]
            with grpc.insecure_channel(server.grpc_url) as channel:
                stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
                message = pb.ModelInferRequest(
                    model_name=MODEL, parameters={"op": pb.InferParameter(string_param="reset")},
                    inputs=[pb.ModelInferRequest.InferInputTensor(
                        name="prompt", datatype="BYTES", shape=[1],
                        contents=pb.InferTensorContents(bytes_contents=[PROMPT.encode()]))])
                with pytest.raises(grpc.RpcError) as err:
                    stub.ModelInfer(message)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
        finally:
            for sid in opened:
                assert infer(http, "close", sid).status_code == 200
        assert infer(http, "reset", "after-full", [prompt_input()]).status_code == 200
        assert infer(http, "close", "after-full").status_code == 200


def test_health_route_and_metadata(server):
    reply = httpx.get(f"{server.url}/healthz")
    assert reply.status_code == 200 and reply.text == "OK\n"
    assert httpx.get(f"{server.url}/v2").json()["extensions"] == []
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert list(stub.ServerMetadata(pb.ServerMetadataRequest()).extensions) == []


def test_a_failure_inside_the_policy_asks_for_the_reset_it_needs(tiny_weights):
    first, _ = episode_script(143, 1)

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            svc = EpisodeService(SessionManager(tiny_weights, 2, None, idle_timeout_s=60), executor)
            s = svc.open()
            await svc.reset(s, PROMPT, 43, "test")

            def broken(images):
                raise RuntimeError("device lost")

            s.policy.act = broken
            with pytest.raises(EpisodeFailed, match="the act failed: RuntimeError: device lost; this episode "
                                                    "cannot go on: send a reset"):
                await svc.act(s, first, "test")
            del s.policy.act
            with pytest.raises(Conflict, match="send a reset"):  # the advice is enforced
                await svc.act(s, first, "test")
            await svc.reset(s, PROMPT, 43, "test")
            actions, _ = await svc.act(s, first, "test")
            svc.close(s.id)
            return actions

    np.testing.assert_array_equal(asyncio.run(scenario()), direct_episode(tiny_weights, PROMPT, 43, 1, 143)[0])


def test_the_evaluation_client_numbers_its_messages_and_a_resent_one_is_replayed(server, tiny_weights):
    from vaops.components.evaluate.client import PolicyClient
    from vaops.components.evaluate.config import ClientConfig
    from vaops.models.msgpack_numpy import unpackb

    first, keyframes = episode_script(144, 2)
    sent = []
    with PolicyClient(ClientConfig(url=server.ws_url)) as client:
        client.reset(PROMPT, seed=44)
        send = client._ws.send
        client._ws.send = lambda raw: (sent.append(raw), send(raw))[1]
        a0 = client.act(first, PROMPT, channels=14, frames_per_latent=4).actions
        client.observe(keyframes[0], a0)
        a1 = client.act(first, PROMPT, channels=14, frames_per_latent=4).actions
        send(sent[-1])  # the last chunk request again, as a client retrying after a lost reply would
        again = unpackb(client._ws.recv(timeout=60))["action"]
    assert [unpackb(raw)["seq"] for raw in sent] == [1, 2, 3]  # the reset was seq 0
    np.testing.assert_array_equal(again, a1)
    for got, want in zip((a0, a1), direct_episode(tiny_weights, PROMPT, 44, 2, 144)):
        np.testing.assert_array_equal(got, want)


def test_an_operating_point_is_chosen_at_reset_over_websocket_and_rest(server, tiny_weights):
    client = UpstreamClient(server.ws_url)
    try:
        assert client.metadata["operating_points"] == ["fast", "paper", "released"]
        paper = websocket_episode(client, PROMPT, 41, 1, 141, operating_point="paper")
        released = websocket_episode(client, PROMPT, 41, 1, 141)  # the same connection, back to its own
        with pytest.raises(RuntimeError, match="operating_point 'turbo': this model offers fast, paper, released"):
            client.infer({"reset": True, "prompt": PROMPT, "operating_point": "turbo"})
    finally:
        client.close()
    for got, want in ((paper, direct_episode(tiny_weights, PROMPT, 41, 1, 141, operating_point="paper")),
                      (released, direct_episode(tiny_weights, PROMPT, 41, 1, 141))):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert not np.array_equal(paper[0], released[0])
    first, _ = episode_script(142, 1)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        reply = infer(http, "reset", "op", [prompt_input()], seed=42, operating_point="turbo")
        assert reply.status_code == 400 and "this model offers fast, paper, released" in reply.json()["error"]
        assert infer(http, "reset", "op", [prompt_input()], seed=42, operating_point="fast").status_code == 200
        reply = infer(http, "act", "op", [json_tensor(CAMERA, first[CAMERA], "UINT8")])
        assert reply.status_code == 200
        assert infer(http, "close", "op").status_code == 200
    want = direct_episode(tiny_weights, PROMPT, 42, 1, 142, operating_point="fast")[0]
    np.testing.assert_array_equal(actions_of(reply), want)


def test_the_evaluation_client_asks_for_an_operating_point_the_server_offers(server, tiny_weights):
    from vaops.components.evaluate.client import PolicyClient, PolicyProtocolError
    from vaops.components.evaluate.config import ClientConfig

    first, _ = episode_script(145, 1)
    with PolicyClient(ClientConfig(url=server.ws_url)) as client:
        client.reset(PROMPT, seed=45, operating_point="fast")
        got = client.act(first, PROMPT, channels=14, frames_per_latent=4).actions
        with pytest.raises(PolicyProtocolError, match=r"offers no operating point 'turbo' \(its metadata lists "
                                                      r"\['fast', 'paper', 'released'\]\)"):
            client.reset(PROMPT, seed=45, operating_point="turbo")
    np.testing.assert_array_equal(got, direct_episode(tiny_weights, PROMPT, 45, 1, 145, operating_point="fast")[0])


def test_bad_input_is_one_line_in_the_server_log(server):
    """A client's mistake is not a server error: kserve's own handlers logged each 400 / INVALID_ARGUMENT at
    ERROR with its traceback (220 kB of them in a 2,000-chunk soak), which alerting on ERROR lines would page for."""
    before = server.log.stat().st_size
    with httpx.Client(base_url=server.url, timeout=60) as http:
        unknown = infer(http, "close", "never-opened-either")
        garbled = http.post(f"/v2/models/{MODEL}/infer", content=b"{not json",
                            headers={"content-type": "application/json"})
    assert unknown.status_code == 400 and "unknown session 'never-opened-either'" in unknown.json()["error"]
    assert 400 <= garbled.status_code < 500, garbled.text  # FastAPI's 422 for a body that is not JSON
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = pb.ModelInferRequest(model_name=MODEL, parameters={
            "op": pb.InferParameter(string_param="close"), "session_id": pb.InferParameter(string_param="nor-this")})
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(message)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown session 'nor-this'" in err.value.details()
    text = server.log.read_bytes()[before:].decode()
    assert "Traceback" not in text and " ERROR " not in text, text
    for session, error in (("never-opened-either", unknown.json()["error"]), ("nor-this", err.value.details())):
        lines = [line for line in text.splitlines() if f"unknown session '{session}'" in line]
        assert len(lines) == 1, text  # one line, a warning in kserve's format (serving/cli.py log_like_kserve)
        assert " vaops.serving.kserve_model WARNING [" in lines[0] and lines[0].endswith(f"bad request: {error}"), text
