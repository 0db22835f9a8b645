"""One closed-loop episode through the policy protocol, for any environment.

The loop is upstream's RoboTwin client's: ask for a chunk `[n_used, FC, N]`, execute every
action (all but the first latent frame of the first chunk, which is the initial observation),
grab a camera keyframe every `N / frames_per_latent` actions, then send the keyframes and the
whole executed action array back. A policy that fails (dead, timed out, malformed reply) ends
the episode as a failure with the reason; the evaluation goes on.

In real time every action takes the control period of wall time (stepping and rendering count
toward it), so the server's work competes with the robot's clock as it would on a robot. The
control loop's idle time is measured per chunk: from the robot finishing a chunk's last action to
it holding the next chunk (the observe and act round trips), beside each chunk's execution time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .client import PolicyClient, PolicyConnectionError, PolicyError

FRAMES_PER_LATENT = 4  # camera frames per latent frame (the Wan VAE's 4x temporal compression)


class EpisodeEnv(Protocol):
    """An environment as the episode loop sees it; actions are in the wire's channel order."""

    prompt: str
    action_channels: int  # length of one action on the wire

    def observation(self) -> dict[str, Any]:
        """The wire observation now: camera key -> uint8 [H, W, 3], 'observation.state', 'task'."""

    def step(self, action: np.ndarray) -> None:
        """Execute one action of `action_channels` values."""

    @property
    def finished(self) -> bool: ...

    @property
    def success(self) -> bool: ...

    @property
    def progress(self) -> float:
        """Fraction of the task's stages reached, in [0, 1]."""

    @property
    def steps(self) -> int: ...

    def camera_frame(self, observation: dict[str, Any]) -> np.ndarray:
        """The real cameras of an observation as one uint8 image, for the episode video."""


@dataclass
class ChunkFrames:
    """The real camera frames taken while one chunk ran, and what the model imagined for it."""

    real: list[np.ndarray]
    expected: int  # real frames the whole chunk would have given (an episode may end mid-chunk)
    imagined: np.ndarray | None  # uint8 [T, H, W, 3] spanning the whole chunk


@dataclass
class EpisodeOutcome:
    success: bool
    progress: float
    steps: int
    chunks: int = 0
    chunk_latency_s: list[float] = field(default_factory=list)
    observe_latency_s: list[float] = field(default_factory=list)
    idle_s: list[float] = field(default_factory=list)  # between chunks: last action done -> next chunk in hand
    execution_s: list[float] = field(default_factory=list)  # per chunk: in hand -> last action done
    error: str | None = None
    connected: bool = True  # False: the server could not be reached at all
    wall_s: float = 0.0
    frames: list[ChunkFrames] = field(default_factory=list)  # filled when recording

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        return "success" if self.success else "failure"


class ControlClock:
    """Paces the actions of a chunk: action i ends `(i + 1) * period_s` after the chunk arrived, and
    only what stepping (and rendering) left of that is slept, so a slow step (a camera frame) is
    made up by the next ones, as on a robot whose control rate does not wait for its cameras.
    A period of 0 executes as fast as the environment steps."""

    def __init__(self, period_s: float = 0.0):
        self.period_s = period_s
        self.deadline = 0.0

    def start(self) -> float:
        self.deadline = time.perf_counter()
        return self.deadline

    def tick(self) -> float:
        """The end of an action's period: sleeps until then; returns the time."""
        self.deadline += self.period_s
        delay = self.deadline - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return time.perf_counter()


def run_episode(client: PolicyClient, env: EpisodeEnv, *, seed: int | None = None, imagine: bool = False,
                record_frames: bool = False, async_execution: bool | str = False,
                control_period_s: float = 0.0, operating_point: str | None = None) -> EpisodeOutcome:
    start = time.perf_counter()
    out = EpisodeOutcome(success=False, progress=0.0, steps=0)
    try:
        _loop(client, env, out, seed, imagine, record_frames, async_execution, ControlClock(control_period_s),
              operating_point)
    except PolicyConnectionError as e:
        out.error = f"{type(e).__name__}: {e}"
        out.connected = False
    except PolicyError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.success, out.progress, out.steps = bool(env.success), float(env.progress), int(env.steps)
    out.wall_s = time.perf_counter() - start
    return out


def _loop(client: PolicyClient, env: EpisodeEnv, out: EpisodeOutcome, seed: int | None, imagine: bool,
          record: bool, async_execution: bool | str, clock: ControlClock, operating_point: str | None = None) -> None:
    prompt = env.prompt
    obs = env.observation()
    initial = [env.camera_frame(obs)] if record else []
    client.reset(prompt, seed, async_execution, operating_point)
    client.check_compatible(env.action_channels, obs)
    # An env with `step_limit_between_chunks` (LIBERO, as upstream's client) finishes its chunk past
    # the step limit; success still ends the episode at once.
    stops_mid_chunk = ((lambda: env.success) if getattr(env, "step_limit_between_chunks", False)
                       else (lambda: env.finished))
    first = True
    done_at = None  # when the robot finished the previous chunk's last action
    while not env.finished:
        reply = client.act(obs, prompt, env.action_channels, FRAMES_PER_LATENT, imagine=imagine)
        received = clock.start()
        if done_at is not None:
            out.idle_s.append(received - done_at)
        done_at = received
        out.chunks += 1
        out.chunk_latency_s.append(reply.latency_s)
        actions = reply.actions
        _, n_frames, per_frame = actions.shape
        interval = per_frame // FRAMES_PER_LATENT
        start = 1 if first else 0
        if record:
            real = initial if first else []
            chunk = ChunkFrames(real, len(real) + (n_frames - start) * FRAMES_PER_LATENT, reply.imagined)
            out.frames.append(chunk)
        keyframes = []
        for f in range(start, n_frames):
            for j in range(per_frame):
                env.step(actions[:, f, j])
                if (j + 1) % interval == 0:
                    obs = env.observation()
                    keyframes.append(obs)
                    if record:
                        chunk.real.append(env.camera_frame(obs))
                done_at = clock.tick()
                if stops_mid_chunk():
                    out.execution_s.append(done_at - received)
                    return
        out.execution_s.append(done_at - received)
        first = False
        out.observe_latency_s.append(client.observe(keyframes, actions))
