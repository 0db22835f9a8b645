"""The upstream LingBot-VA websocket protocol (openpi-style msgpack-numpy), so the reference
RoboTwin client (`WebsocketClientPolicy(host, port)`) works unchanged.

On connect the server sends a metadata map. Then, per message:
- `{reset: true, prompt, seed?, async_execution?, operating_point?}` -> `{}`: starts an episode (the connection's
  session is opened at the first reset and closed when the connection closes); with
  `async_execution: true` the server computes each next chunk while the robot executes the current
  one, so the observe waits for it and the next action request is answered at once
  (`async_execution: "grounded"`: first re-imagining the executing chunk from the latest observation);
- `{compute_kv_cache: true, obs: [keyframes...], state: executed actions [n_used, F, N]}` -> `{}`;
- otherwise `{obs: {camera images..., observation.state, task}, prompt}` -> `{action: [n_used, FC, N]}`
  (plus `imagined`, the chunk's decoded video, when the request says `imagine: true`).
Every message may carry `seq`, an integer increasing over the connection's episode: a message with
the last message's `seq` is a retry and gets the same reply again, computed once (the metadata says
`sequence_numbers: true`). A message the server refuses is answered with a text frame holding the
reason (the openpi client raises it as `RuntimeError`); the connection and every other session stay up.
"""

from __future__ import annotations

import logging

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from vaops.models.msgpack_numpy import UnpackLimits, WireError, packb, unpackb

from . import metrics
from .episode import ASYNC_MODES, EpisodeFailed, EpisodeService, InputError
from .sessions import Draining, Session, SessionError

log = logging.getLogger(__name__)

# Optional: a request carrying `imagine: true` also gets the chunk's imagined video (its predicted
# latents decoded, uint8 [T, H, W, 3]) under `imagined`.
IMAGINE_FLAG = "imagine"
IMAGINED_FIELD = "imagined"


def server_metadata(name: str, episodes: EpisodeService) -> dict:
    preset = episodes.preset
    return {
        "server": "vaops",
        "model": name,
        "preset": preset.name,
        "cameras": {c.key: [c.height, c.width] for c in preset.cameras},
        "action_channels": len(preset.used_action_channels),
        "frame_chunk_size": preset.frame_chunk_size,
        "action_per_frame": preset.action_per_frame,
        "frames_per_latent": preset.frames_per_latent,
        "async_execution": True,  # the reset may ask for it
        "async_modes": list(ASYNC_MODES),  # async_execution may name one; true is "naive"
        # the reset may name one (policy.json operating_points); none: the model's own sampling
        "operating_points": sorted(preset.operating_point_settings()),
        "sequence_numbers": True,  # messages may carry `seq`; a repeated one is answered again, not recomputed
    }


class EpisodeSocket:
    """One websocket connection: one session at a time, as the upstream server holds one episode."""

    def __init__(self, name: str, episodes: EpisodeService, limits: UnpackLimits):
        self.name = name
        self.episodes = episodes
        self.limits = limits

    async def __call__(self, websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_bytes(packb(server_metadata(self.name, self.episodes)))
        session: Session | None = None
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                reply: str | bytes
                if data is None:
                    reply = self._error("invalid", "expected a binary msgpack frame, got a text frame")
                else:
                    try:
                        session, reply = await self._handle(session, unpackb(data, self.limits))
                    except Draining as e:  # stopping: the client reconnects to the server that takes new episodes
                        reply = self._error("unavailable", str(e))
                    except (WireError, InputError, SessionError) as e:
                        reply = self._error("invalid", str(e))
                    except EpisodeFailed as e:  # the policy failed; the text says the episode needs a reset
                        log.error("websocket request failed: %s", e, exc_info=e.__cause__)
                        reply = self._error("internal", str(e))
                    except Exception as e:  # a fault outside the policy: report it, keep serving
                        log.exception("websocket request failed")
                        reply = self._error("internal", f"internal error: {type(e).__name__}: {e}")
                if isinstance(reply, str):
                    await websocket.send_text(reply)
                else:
                    await websocket.send_bytes(reply)
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                self.episodes.close(session.id)

    @staticmethod
    def _error(kind: str, text: str) -> str:
        metrics.ERRORS.labels("websocket", kind).inc()
        return text

    async def _handle(self, session: Session | None, msg) -> tuple[Session | None, bytes]:
        if not isinstance(msg, dict):
            raise InputError(f"a message must be a map, got {type(msg).__name__}")
        sessions = self.episodes.sessions
        if msg.get("reset"):
            new = session is None or session.id not in sessions
            target = self.episodes.open() if session is None or new else session
            try:
                await self.episodes.reset(target, msg.get("prompt", ""), msg.get("seed"), "websocket",
                                          msg.get("async_execution", False), seq=msg.get("seq"),
                                          operating_point=msg.get("operating_point"))
            except Exception:
                if new:  # a failed first reset leaves no session behind
                    self.episodes.close(target.id)
                raise
            return target, packb({})
        if session is None:
            raise InputError("no episode on this connection: send {reset: true, prompt} first")
        session = sessions.get(session.id)
        obs = msg.get("obs")
        if msg.get("compute_kv_cache"):
            keyframes = obs if isinstance(obs, list) else ([obs] if obs is not None else [])
            await self.episodes.observe(session, keyframes, msg.get("state"), "websocket", seq=msg.get("seq"))
            return session, packb({})
        if obs is None:
            raise InputError("an action request needs obs: {camera images...}")
        actions, imagined = await self.episodes.act(session, obs, "websocket", imagine=msg.get(IMAGINE_FLAG, False),
                                                    seq=msg.get("seq"))
        reply = {"action": np.ascontiguousarray(actions, dtype=np.float32)}
        if imagined is not None:
            reply[IMAGINED_FIELD] = imagined
        return session, packb(reply)
