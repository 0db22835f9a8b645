"""A registered model served by its alias with `vaops deploy --local`, behind a bearer token, with a
small request limit and a short idle timeout."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import numpy as np
import pytest
import websockets.exceptions
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.infer_type import to_http_parameters
from serving_support import MODEL, TOKEN, ServerProcess, UpstreamClient, direct_episode, websocket_episode

pytestmark = pytest.mark.xdist_group("registry")
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def registered(tiny_checkpoint, tmp_path_factory, monkeypatch_module):
    from vaops.components.register.registry import RegisterConfig, run

    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", uri)
    (work / "metrics.json").write_text(json.dumps({"success_rate": 0.8}))
    result = run(RegisterConfig(checkpoint=tiny_checkpoint, name="policy", metrics=work / "metrics.json"))
    assert result.decision.promote
    proc = ServerProcess("models:/policy@champion", work, work / "server.log", "--max-request-mb", "1",
                         "--idle-timeout", "2", token=TOKEN, env={"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"},
                         command="deploy").wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def prompt_request(**params) -> InferRequest:
    t = InferInput("prompt", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"pick up the cube"], dtype=object), binary_data=True)
    return InferRequest(model_name=MODEL, infer_inputs=[t], parameters={"op": "reset", **params})


def test_serves_the_champion_by_alias(registered, tiny_weights):
    log = registered.log.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{registered.http_port}" in log  # loopback only
    client = UpstreamClient(registered.ws_url, api_key=TOKEN)  # openpi's client sends "Api-Key <key>"
    try:
        got = websocket_episode(client, "pick up the cube", 31, 2, 301)
    finally:
        client.close()
    for g, w in zip(got, direct_episode(tiny_weights, "pick up the cube", 31, 2, 301)):
        np.testing.assert_array_equal(g, w)


def test_token_guards_every_protocol_but_health(registered):
    url = registered.url
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", "/metrics", "/healthz"):
        assert httpx.get(url + path).status_code == 200, path
    # metadata: one rule on both protocols, the token
    for path in ("/v2", f"/v2/models/{MODEL}"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers=AUTH).status_code == 200, path
    with grpc.insecure_channel(registered.grpc_url) as channel:
        stub = grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        for call, message in ((stub.ServerMetadata, pb.ServerMetadataRequest()),
                              (stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL))):
            with pytest.raises(grpc.RpcError) as err:
                call(message)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call(message, metadata=(("authorization", f"Bearer {TOKEN}"),))
    body = {"inputs": [], "parameters": {"op": "close", "session_id": "x"}}
    denied = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body)
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, headers={"authorization": "Bearer nope-nope-nope"})
    assert wrong.status_code == 401
    allowed = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, headers=AUTH)
    assert allowed.status_code == 400 and "unknown session" in allowed.json()["error"]
    with pytest.raises(websockets.exceptions.InvalidStatus, match="403"):
        UpstreamClient(registered.ws_url)

    async def grpc_calls():
        async with InferenceGRPCClient(registered.grpc_url, retries=0) as client:
            assert await client.is_server_ready()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.infer(prompt_request())
            reply = await client.infer(prompt_request(), headers=(("authorization", f"Bearer {TOKEN}"),))
            await client.infer(InferRequest(model_name=MODEL, infer_inputs=[], parameters={
                "op": "close", "session_id": to_http_parameters(reply.parameters)["session_id"]}),
                headers=(("authorization", f"Bearer {TOKEN}"),))
            return err.value

    error = asyncio.run(grpc_calls())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_request_size_limit(registered):
    big = httpx.post(f"{registered.url}/v2/models/{MODEL}/infer", content=b"x" * (2 * 2**20),
                     headers={**AUTH, "content-type": "application/json"})
    assert big.status_code == 413 and "byte limit" in big.json()["error"]
    client = UpstreamClient(registered.ws_url, api_key=TOKEN)
    # Only the header of a 2 MiB binary frame (masked, as a client sends it): the server refuses on
    # the declared length, so its close frame arrives before the client would write the payload
    # (sending the payload races the close into a connection reset).
    client.ws.socket.sendall(bytes([0x82, 0x80 | 127]) + (2 * 2**20).to_bytes(8, "big") + b"\x00" * 4)
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        client.ws.recv(timeout=30)
    assert closed.value.rcvd.code == 1009  # message too big; only this connection is closed
    assert httpx.get(f"{registered.url}/v2/health/ready").status_code == 200


def test_idle_sessions_expire(registered):
    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        http = httpx.AsyncClient(base_url=registered.url)
        reply = await client.infer(registered.url, prompt_request(), model_name=MODEL, headers=dict(AUTH))
        sid = to_http_parameters(reply.parameters)["session_id"]
        assert "vaops_sessions 1.0" in (await http.get("/metrics")).text
        await asyncio.sleep(4.0)  # idle timeout 2 s, swept every second
        metrics = (await http.get("/metrics")).text
        await http.aclose()
        with pytest.raises(httpx.HTTPStatusError, match="unknown session") as err:
            act = InferRequest(model_name=MODEL, infer_inputs=[], parameters={"op": "act", "session_id": sid})
            await client.infer(registered.url, act, model_name=MODEL, headers=dict(AUTH))
        await client.close()
        return metrics, err.value

    metrics, error = asyncio.run(run())
    assert "vaops_sessions 0.0" in metrics
    assert "expired after 2 s idle" in error.response.json()["error"]


def test_registry_download_is_cached(registered, monkeypatch):
    from vaops.models.model_source import resolve_checkpoint

    cache = registered.log.parent / "model-cache"
    monkeypatch.setenv("VAOPS_MODEL_CACHE", str(cache))
    (marker,) = cache.glob("policy/1-*/.complete")  # the server's start downloaded version 1 once
    stamp = marker.stat().st_mtime_ns
    folder = resolve_checkpoint("models:/policy@champion")
    assert folder == marker.parent / "artifacts" / "checkpoint" and (folder / "policy.json").is_file()
    assert resolve_checkpoint("models:/policy/1") == folder and marker.stat().st_mtime_ns == stamp
