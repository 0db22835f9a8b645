"""The embedded MuJoCo ALOHA sim as an episode environment.

The scenes, seeds, prompts, success check and action execution are the data stage's
(`vaops.components.demos.sim`), so a policy trained on the scripted demonstrations is
evaluated in exactly the setting it was trained for: the top camera rendered and resized as
the demonstrations recorded it, one action per 1/fps seconds executed as `hold_targets` at the
sim's 50 Hz, reward stages 0-4 (4 = success). Evaluation seeds start at `10000 * (1 + seed)`, away from the
demonstrations' seeds (0, 1, ...).

On the wire an action is the 14 joint targets in gym-aloha's order (left six joints, left
gripper, right six joints, right gripper), which is the order of the model channels
`ALOHA_CHANNELS` the policy sends.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vaops.components.demos import sim
from vaops.models.config import ALOHA_CAMERAS, ALOHA_CHANNELS

CAMERA = ALOHA_CAMERAS[0]
ACTION_CHANNELS = len(ALOHA_CHANNELS)


def camera_size(metadata: dict | None) -> tuple[int, int]:
    """The top camera's size the server's model takes (its metadata), else the demos' default: the
    frames are rendered at the size the policy was trained on, not resized on the server."""
    size = ((metadata or {}).get("cameras") or {}).get(CAMERA.key)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    return CAMERA.height, CAMERA.width


def episode_seed(seed: int, episode: int) -> int:
    return 10000 * (1 + seed) + episode


class AlohaEpisode:
    """One seeded episode of an ALOHA task in the joint-space scene."""

    action_channels = ACTION_CHANNELS

    def __init__(self, task: str, seed: int, max_steps: int, fps: int,
                 size: tuple[int, int] = (CAMERA.height, CAMERA.width)):
        if fps <= 0 or sim.CONTROL_HZ % fps:
            raise ValueError(f"fps={fps}: must divide the sim's control rate of {sim.CONTROL_HZ} Hz")
        self.task = task
        self.prompt = sim.get_task(task).task_text
        self.hold = sim.CONTROL_HZ // fps
        self.control_period_s = self.hold / sim.CONTROL_HZ  # the sim time one action takes
        self.max_steps = max_steps
        self.size = size
        self.env, self.physics = sim.joint_environment(task, sim.object_poses(task, seed))
        self.qpos = np.asarray(self.env.reset().observation["qpos"], np.float32)
        self.previous = self.qpos.astype(np.float64)
        self.best_reward = 0.0
        self._steps = 0

    def observation(self) -> dict[str, Any]:
        image = sim.render_top(self.physics, *self.size)
        return {CAMERA.key: image, "observation.state": self.qpos.copy(), "task": self.prompt}

    def step(self, action: np.ndarray) -> None:
        action = np.asarray(action, np.float64)
        for target in sim.hold_targets(self.previous, action, self.hold):
            ts = self.env.step(target)
            self.best_reward = max(self.best_reward, float(ts.reward or 0.0))
        self.qpos = np.asarray(ts.observation["qpos"], np.float32)
        self.previous = action
        self._steps += 1

    @property
    def steps(self) -> int:
        return self._steps

    @property
    def success(self) -> bool:
        return self.best_reward >= sim.SUCCESS_REWARD

    @property
    def progress(self) -> float:
        return min(1.0, self.best_reward / sim.SUCCESS_REWARD)

    @property
    def finished(self) -> bool:
        return self.success or self._steps >= self.max_steps

    def camera_frame(self, obs: dict[str, Any]) -> np.ndarray:
        return obs[CAMERA.key]
