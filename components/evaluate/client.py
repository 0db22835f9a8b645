"""A client of the upstream policy protocol (websocket, msgpack with numpy arrays).

One episode, as upstream's RoboTwin client speaks it:

    {reset: True, prompt}                                   -> {}
    {obs: {camera images, observation.state, task}, prompt} -> {action: [n_used, FC, N]}
    {obs: [keyframes...], compute_kv_cache: True, state}    -> {}      (after executing)

`vaops serve` also offers asynchronous execution (`async_execution: True` in the reset): the same
messages, but the server computes each next chunk while the robot executes the current one.

A server may open every connection with a metadata message (openpi's server does); a server
error arrives as a text frame. The server keeps the episode's KV cache per connection, so a
connection lost mid-episode cannot be resumed: the episode fails with the reason and the next
`reset` reconnects.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.sync.client import ClientConnection, connect

from vaops.models.msgpack_numpy import WireError, packb, unpackb

from .config import ClientConfig

# Optional reply field: the server's imagined video of the chunk (decoded predicted latents),
# uint8 [T, H, W, 3], sent when the request carries IMAGINE_FLAG.
IMAGINE_FLAG = "imagine"
IMAGINED_FIELD = "imagined"
# Reset field and metadata flag of servers that compute the next chunk while the robot executes.
ASYNC_FIELD = "async_execution"
ASYNC_MODES_FIELD = "async_modes"  # the modes a vaops server's async_execution may name (grounded)
OPERATING_POINTS_FIELD = "operating_points"
# Metadata flag of servers that take a sequence number (`seq`, increasing per connection) on every
# message and answer a repeated one again instead of computing it twice; sent only to those.
SEQ_FIELD = "seq"
SEQ_FLAG = "sequence_numbers"


class PolicyError(RuntimeError):
    """The policy server misbehaved: unreachable, timed out, died, or answered nonsense."""


class PolicyConnectionError(PolicyError):
    """No connection could be made (server down, wrong address, handshake refused)."""


class PolicyDisconnected(PolicyError):
    """The connection dropped or timed out mid-request; the server's episode state is gone."""


class PolicyServerError(PolicyError):
    """The server reported an error (a text frame, as openpi's server sends its traceback)."""


class PolicyProtocolError(PolicyError):
    """A reply that does not follow the protocol (undecodable, wrong fields, malformed actions)."""


@dataclass
class ChunkReply:
    actions: np.ndarray  # float32 [n_used, FC, N]
    imagined: np.ndarray | None  # uint8 [T, H, W, 3] or None
    latency_s: float


def check_actions(actions: Any, channels: int, frames_per_latent: int) -> np.ndarray:
    """The reply's `action` as float32 [channels, FC, N], or PolicyProtocolError naming what is wrong."""
    if not isinstance(actions, np.ndarray):
        raise PolicyProtocolError(f"reply field 'action' must be an array, got {type(actions).__name__}")
    if actions.dtype.kind != "f":
        raise PolicyProtocolError(f"reply field 'action' must be floating point, got dtype {actions.dtype}")
    if actions.ndim != 3 or actions.shape[0] != channels or min(actions.shape) == 0:
        raise PolicyProtocolError(f"reply field 'action' must have shape [{channels}, FC, N], got {list(actions.shape)}")
    if actions.shape[2] % frames_per_latent:
        raise PolicyProtocolError(f"reply field 'action' has N={actions.shape[2]} actions per latent frame, "
                                  f"not a multiple of the {frames_per_latent} camera frames per latent frame")
    if not np.isfinite(actions).all():
        raise PolicyProtocolError("reply field 'action' contains NaN or inf")
    return actions.astype(np.float32, copy=False)


def check_imagined(video: Any) -> np.ndarray:
    if not (isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3):
        shape = list(video.shape) if isinstance(video, np.ndarray) else type(video).__name__
        raise PolicyProtocolError(f"reply field {IMAGINED_FIELD!r} must be uint8 [T, H, W, 3], got {shape}")
    return video


class PolicyClient:
    def __init__(self, config: ClientConfig):
        self.config = config
        self._ws: ClientConnection | None = None
        self._stack = ExitStack()
        self.metadata: dict | None = None
        self._seq = 0

    # -- connection -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._ws is not None

    def connect(self) -> None:
        """Open a connection, retrying `connect_attempts` times; reads the optional metadata."""
        self.close()
        cfg = self.config
        last: Exception | None = None
        for attempt in range(cfg.connect_attempts):
            if attempt:
                time.sleep(cfg.retry_delay_s)
            try:
                # No keepalive pings: a server busy denoising may not answer them in time, and
                # the request timeout already bounds how long a dead server can stall us.
                headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else None
                ws = self._stack.enter_context(connect(
                    cfg.url, open_timeout=cfg.connect_timeout_s, max_size=None, compression=None,
                    ping_interval=None, close_timeout=1, additional_headers=headers))
            except InvalidURI as e:
                raise PolicyConnectionError(f"policy url {cfg.url!r} is not a websocket url: {e}") from None
            except InvalidStatus as e:
                code = e.response.status_code
                hint = " (missing or wrong token?)" if code in (401, 403) else ""
                raise PolicyConnectionError(f"policy server at {cfg.url} refused the connection: HTTP {code}{hint}") from None
            except (OSError, TimeoutError, InvalidHandshake) as e:
                last = e
                continue
            self._ws = ws
            self._seq = 0
            self.metadata = self._read_metadata()
            return
        raise PolicyConnectionError(f"policy server at {cfg.url} unreachable after {cfg.connect_attempts} "
                                    f"attempt(s): {type(last).__name__}: {last}")

    def _read_metadata(self) -> dict | None:
        if self._ws is None:
            return None
        try:
            raw = self._ws.recv(timeout=self.config.metadata_timeout_s)
        except TimeoutError:
            return None
        except ConnectionClosed as e:
            self.close()
            raise PolicyConnectionError(f"policy server at {self.config.url} closed the connection on "
                                        f"opening: {e}") from None
        if isinstance(raw, str):
            self.close()
            raise PolicyServerError(f"policy server at {self.config.url} refused the connection: {raw[-2000:]}")
        try:
            meta = unpackb(raw)
        except WireError as e:
            self.close()
            raise PolicyProtocolError(f"undecodable metadata from {self.config.url}: {e}") from None
        return meta if isinstance(meta, dict) else {"metadata": meta}

    def close(self) -> None:
        if self._ws is not None:
            self._ws = None
            try:
                self._stack.close()
            except Exception:  # closing a broken socket may fail again; it is gone either way
                pass

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------
    def _call(self, message: dict, what: str) -> tuple[dict, float]:
        if self._ws is None:
            raise PolicyDisconnected(f"{what}: not connected to {self.config.url} (the episode's server state is lost)")
        if (self.metadata or {}).get(SEQ_FLAG) is True:
            message = {**message, SEQ_FIELD: self._seq}
            self._seq += 1
        start = time.perf_counter()
        try:
            self._ws.send(packb(message))
            raw = self._ws.recv(timeout=self.config.request_timeout_s)
        except TimeoutError:
            self.close()
            raise PolicyDisconnected(f"{what}: no reply from {self.config.url} within "
                                     f"{self.config.request_timeout_s:g} s") from None
        except (ConnectionClosed, OSError) as e:
            self.close()
            raise PolicyDisconnected(f"{what}: connection to {self.config.url} lost: {type(e).__name__}: {e}") from None
        latency = time.perf_counter() - start
        if isinstance(raw, str):
            raise PolicyServerError(f"{what}: server error: {raw.strip()[-2000:]}")
        try:
            reply = unpackb(raw)
        except WireError as e:
            raise PolicyProtocolError(f"{what}: undecodable reply: {e}") from None
        if not isinstance(reply, dict):
            raise PolicyProtocolError(f"{what}: reply must be a map, got {type(reply).__name__}")
        return reply, latency

    def reset(self, prompt: str, seed: int | None = None, async_execution: bool | str = False,
              operating_point: str | None = None) -> None:
        """Start an episode; (re)connects when there is no live connection. The seed makes the
        server's sampling reproducible where it supports one (upstream's ignores it). With
        `async_execution` the server computes each next chunk while the robot executes the current
        one (a mode name, "grounded", asks for that variant); a server whose metadata does not offer it is
        refused rather than silently synchronous."""
        if self._ws is None:
            self.connect()
        message: dict[str, Any] = {"reset": True, "prompt": prompt}
        if seed is not None:
            message["seed"] = seed
        if async_execution:
            if not (self.metadata or {}).get(ASYNC_FIELD):
                raise PolicyProtocolError(f"the policy server at {self.config.url} does not offer asynchronous "
                                          f"execution (no {ASYNC_FIELD!r} in its metadata)")
            if isinstance(async_execution, str) and async_execution != "naive":
                modes = (self.metadata or {}).get(ASYNC_MODES_FIELD) or []
                if async_execution not in modes:
                    raise PolicyProtocolError(f"the policy server at {self.config.url} offers no {async_execution!r} "
                                              f"asynchronous execution (its metadata lists {modes})")
            message[ASYNC_FIELD] = async_execution if isinstance(async_execution, str) else True
        if operating_point is not None:
            offered = (self.metadata or {}).get(OPERATING_POINTS_FIELD) or []
            if operating_point not in offered:
                raise PolicyProtocolError(f"the policy server at {self.config.url} offers no operating point "
                                          f"{operating_point!r} (its metadata lists {offered})")
            message["operating_point"] = operating_point
        self._call(message, "reset")

    def check_compatible(self, action_channels: int, observation: Mapping[str, Any]) -> None:
        """Compare the server's metadata (when it sent any) with what the environment provides."""
        meta = self.metadata or {}
        channels = meta.get("action_channels")
        if channels is not None and channels != action_channels:
            raise PolicyProtocolError(f"the server's model sends {channels} action channels; "
                                      f"this environment takes {action_channels}")
        cameras = meta.get("cameras")
        if isinstance(cameras, dict):
            missing = [k for k in cameras if k not in observation]
            if missing:
                have = sorted(k for k, v in observation.items() if isinstance(v, np.ndarray) and v.ndim == 3)
                raise PolicyProtocolError(f"the server's model needs camera(s) {missing}; this environment has {have}")

    def act(self, obs: Mapping[str, Any], prompt: str, channels: int, frames_per_latent: int,
            imagine: bool = False) -> ChunkReply:
        message: dict[str, Any] = {"obs": dict(obs), "prompt": prompt}
        if imagine:
            message[IMAGINE_FLAG] = True
        reply, latency = self._call(message, "chunk request")
        if "action" not in reply:
            raise PolicyProtocolError(f"chunk request: reply has no 'action' field (fields: {sorted(map(str, reply))})")
        actions = check_actions(reply["action"], channels, frames_per_latent)
        imagined = reply.get(IMAGINED_FIELD)
        return ChunkReply(actions, None if imagined is None else check_imagined(imagined), latency)

    def observe(self, keyframes: Sequence[Mapping[str, Any]], executed: np.ndarray) -> float:
        """Send the keyframes and the executed action array; returns the round-trip seconds."""
        _, latency = self._call({"obs": [dict(k) for k in keyframes], "compute_kv_cache": True,
                                 "state": np.asarray(executed)}, "observation update")
        return latency
