"""RoboTwin 2.0 inside a checkout given by path, evaluated as the LingBot-VA paper reports it.

RoboTwin is not installable (SAPIEN, mplib, CuRobo, its assets) and works only from its own
root (relative `./task_config`, `./assets`), so the adapter puts the checkout first on
`sys.path`, changes into it for the duration, and imports its modules dynamically:
`envs.<task>.<task>` (the task classes), `envs.CONFIGS_PATH`, `envs.utils.create_actor.UnStableError`
and `description.utils.generate_episode_instructions.generate_episode_descriptions`.

Protocol (upstream's `evaluation/robotwin/eval_polict_client_openpi.py`, RoboTwin's eval loop):
- settings: `clean` = task config `demo_clean` (the paper's Easy), `randomized` = `demo_randomized` (Hard);
- per task and setting 100 trials; seeds walk up from `10000 * (1 + seed)` (seed 0), skipping
  every seed whose scene is unstable or that the scripted expert cannot solve;
- the instruction: one of the episode's "seen" descriptions;
- end-effector actions (16 channels: left xyz + quat + gripper, right xyz + quat + gripper) are
  relative to the episode's initial end-effector pose: translation added, rotation composed
  `init * delta`, quaternions renormalised, then `take_action(action, action_type="ee")`;
- the episode ends at success (`eval_success`) or at the task's step limit.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import yaml
from scipy.spatial.transform import Rotation

ROBOTWIN_TASKS = (
    "adjust_bottle", "beat_block_hammer", "blocks_ranking_rgb", "blocks_ranking_size", "click_alarmclock",
    "click_bell", "dump_bin_bigbin", "grab_roller", "handover_block", "handover_mic", "hanging_mug",
    "lift_pot", "move_can_pot", "move_pillbottle_pad", "move_playingcard_away", "move_stapler_pad",
    "open_laptop", "open_microwave", "pick_diverse_bottles", "pick_dual_bottles", "place_a2b_left",
    "place_a2b_right", "place_bread_basket", "place_bread_skillet", "place_burger_fries", "place_can_basket",
    "place_cans_plasticbox", "place_container_plate", "place_dual_shoes", "place_empty_cup", "place_fan",
    "place_mouse_pad", "place_object_basket", "place_object_scale", "place_object_stand", "place_phone_stand",
    "place_shoe", "press_stapler", "put_bottles_dustbin", "put_object_cabinet", "rotate_qrcode", "scan_object",
    "shake_bottle", "shake_bottle_horizontally", "stack_blocks_three", "stack_blocks_two", "stack_bowls_three",
    "stack_bowls_two", "stamp_seal", "turn_switch",
)
TASK_CONFIGS = {"clean": "demo_clean", "randomized": "demo_randomized"}
SETTING_LABELS = {"clean": "Easy", "randomized": "Hard"}
PAPER_TRIALS = 100
# LingBot-VA's reported average success (%) over the 50 tasks (arXiv 2601.21998).
PAPER_AVERAGE = {"clean": 92.93, "randomized": 91.55}
INSTRUCTION_TYPE = "seen"
# Wire camera key -> RoboTwin camera name, in the order the model's layout expects.
CAMERAS = {
    "observation.images.cam_high": "head_camera",
    "observation.images.cam_left_wrist": "left_camera",
    "observation.images.cam_right_wrist": "right_camera",
}
EEF_CHANNELS = 16


def first_seed(seed: int) -> int:
    return 10000 * (1 + seed)


def wire_observation(raw: dict, prompt: str) -> dict[str, Any]:
    """A RoboTwin `get_obs()` dict -> the wire observation the reference client sends."""
    try:
        obs = {key: raw["observation"][cam]["rgb"] for key, cam in CAMERAS.items()}
        obs["observation.state"] = np.asarray(raw["joint_action"]["vector"], dtype=np.float64)
    except KeyError as e:
        raise KeyError(f"RoboTwin observation lacks {e}; the task config must collect the head and "
                       f"wrist cameras' rgb and qpos") from None
    obs["task"] = prompt
    return obs


def initial_pose(raw: dict) -> np.ndarray:
    """[left xyz quat gripper, right xyz quat gripper] (16) from a RoboTwin observation."""
    try:
        e = raw["endpose"]
        pose = list(e["left_endpose"]) + [e["left_gripper"]] + list(e["right_endpose"]) + [e["right_gripper"]]
    except KeyError as err:
        raise KeyError(f"RoboTwin observation lacks endpose field {err}; enable data_type.endpose") from None
    return np.asarray(pose, dtype=np.float64)


def _compose(delta: np.ndarray, init: np.ndarray) -> np.ndarray:
    rot = (Rotation.from_quat(init[3:7]) * Rotation.from_quat(delta[3:7])).as_quat()
    rot = rot / np.linalg.norm(rot)
    return np.concatenate([delta[:3] + init[:3], rot, delta[7:8]])


def ee_command(action: np.ndarray, init: np.ndarray) -> np.ndarray:
    """A 16-channel action relative to the initial end-effector poses -> the absolute command."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (EEF_CHANNELS,):
        raise ValueError(f"RoboTwin end-effector action must have {EEF_CHANNELS} values, got {action.shape}")
    return np.concatenate([_compose(action[:8], init[:8]), _compose(action[8:], init[8:])])


def camera_mosaic(obs: dict[str, Any]) -> np.ndarray:
    """High camera | left wrist | right wrist, each scaled to the high camera's height."""
    from PIL import Image

    frames = [np.asarray(obs[k]) for k in CAMERAS]
    h = frames[0].shape[0]
    parts = [f if f.shape[0] == h else
             np.asarray(Image.fromarray(f).resize((round(f.shape[1] * h / f.shape[0]), h), Image.BILINEAR))
             for f in frames]
    return np.concatenate(parts, axis=1)


def _module_places(module) -> list[str]:
    """A module's file and, for a (namespace) package, its folders."""
    places = [getattr(module, "__file__", None) or ""]
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.submodule_search_locations is not None:
        places += [str(p) for p in spec.submodule_search_locations]
    return places


class RoboTwinCheckout(AbstractContextManager):
    """A RoboTwin 2.0 checkout, importable while the context is open."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        for needed in ("envs", "task_config", "description"):
            if not (self.root / needed).is_dir():
                raise FileNotFoundError(f"{self.root}: not a RoboTwin 2.0 checkout (no {needed}/ folder)")
        self._saved: tuple[str, list[str]] | None = None

    def __enter__(self) -> "RoboTwinCheckout":
        self._saved = (os.getcwd(), list(sys.path))
        sys.path.insert(0, str(self.root))
        os.chdir(self.root)
        try:
            envs = importlib.import_module("envs")
            self.configs_path = str(getattr(envs, "CONFIGS_PATH", self.root / "task_config"))
            self.unstable_error = importlib.import_module("envs.utils.create_actor").UnStableError
            self.describe_episodes: Callable = importlib.import_module(
                "description.utils.generate_episode_instructions").generate_episode_descriptions
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        cwd, path = self._saved
        os.chdir(cwd)
        sys.path[:] = path
        # Forget the checkout's modules so that another checkout (or a re-run) imports afresh.
        inside = str(self.root) + os.sep
        stale = [name for name, module in list(sys.modules.items())
                 if any(place.startswith(inside) for place in _module_places(module))]
        for name in stale:  # after the scan: a namespace package's path is looked up through its parent
            del sys.modules[name]

    def _yaml(self, path: str | os.PathLike) -> dict:
        try:
            with open(path, encoding="utf-8") as f:
                return yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"RoboTwin checkout {self.root}: {path} is missing") from None

    def task_args(self, task: str, setting: str) -> dict:
        """The keyword arguments of `setup_demo`, assembled as RoboTwin's eval entry point does."""
        if setting not in TASK_CONFIGS:
            raise ValueError(f"RoboTwin setting must be one of {list(TASK_CONFIGS)}, got {setting!r}")
        cfg = TASK_CONFIGS[setting]
        args = self._yaml(self.root / "task_config" / f"{cfg}.yml")
        args.update(task_name=task, task_config=cfg, ckpt_setting="vaops", policy_name="vaops", eval_mode=True,
                    eval_video_log=False)
        embodiments = self._yaml(self.root / self.configs_path / "_embodiment_config.yml")
        cameras = self._yaml(self.root / self.configs_path / "_camera_config.yml")

        def robot_file(name: str) -> str:
            try:
                return embodiments[name]["file_path"]
            except (KeyError, TypeError):
                raise ValueError(f"{cfg}.yml: embodiment {name!r} is not in _embodiment_config.yml") from None

        head = args["camera"]["head_camera_type"]
        args["head_camera_h"], args["head_camera_w"] = cameras[head]["h"], cameras[head]["w"]
        embodiment = args["embodiment"]
        if len(embodiment) == 1:
            args["left_robot_file"] = args["right_robot_file"] = robot_file(embodiment[0])
            args["dual_arm_embodied"] = True
        elif len(embodiment) == 3:
            args["left_robot_file"], args["right_robot_file"] = robot_file(embodiment[0]), robot_file(embodiment[1])
            args["embodiment_dis"] = embodiment[2]
            args["dual_arm_embodied"] = False
        else:
            raise ValueError(f"{cfg}.yml: embodiment must list 1 or 3 items, got {embodiment!r}")
        for side in ("left", "right"):
            args[f"{side}_embodiment_config"] = self._yaml(self.root / args[f"{side}_robot_file"] / "config.yml")
        return args

    def make_task(self, task: str):
        if not (self.root / "envs" / f"{task}.py").is_file():
            raise ValueError(f"RoboTwin checkout {self.root} has no task {task!r} (envs/{task}.py)")
        module = importlib.import_module(f"envs.{task}")
        return getattr(module, task)()

    def instruction(self, task: str, episode_info: dict, trials: int) -> str:
        described = self.describe_episodes(task, [episode_info["info"]], trials)
        return str(np.random.choice(described[0][INSTRUCTION_TYPE]))


class RoboTwinEpisode:
    """One trial of a RoboTwin task env after `setup_demo`, as an `EpisodeEnv`."""

    action_channels = EEF_CHANNELS

    def __init__(self, task_env, prompt: str, max_steps: int | None):
        self.env = task_env
        self.prompt = prompt
        limit = task_env.step_lim
        self.step_limit = limit if max_steps is None else min(limit, max_steps)
        self.init = initial_pose(task_env.get_obs())

    def observation(self) -> dict[str, Any]:
        return wire_observation(self.env.get_obs(), self.prompt)

    def step(self, action: np.ndarray) -> None:
        self.env.take_action(ee_command(action, self.init), action_type="ee")

    @property
    def steps(self) -> int:
        return int(self.env.take_action_cnt)

    @property
    def success(self) -> bool:
        return bool(self.env.eval_success)

    @property
    def progress(self) -> float:
        return 1.0 if self.success else 0.0  # RoboTwin scores success only

    @property
    def finished(self) -> bool:
        return self.success or self.steps >= self.step_limit

    def camera_frame(self, obs: dict[str, Any]) -> np.ndarray:
        return camera_mosaic(obs)


@dataclass
class Trial:
    index: int
    seed: int
    episode: RoboTwinEpisode


def trials(checkout: RoboTwinCheckout, task: str, setting: str, count: int, seed: int,
           max_steps: int | None, resume: tuple[int, int] | None = None,
           on_skip: Callable[[int, str], None] | None = None) -> Iterator[Trial]:
    """Yield `count` trials of a task, each on the next seed the scripted expert can solve.

    `resume=(done, next_seed)` continues an interrupted walk. The task env is closed after each
    trial is consumed (the caller runs the episode between two `next()` calls).
    """
    env = checkout.make_task(task)
    args = checkout.task_args(task, setting)
    done, now_seed = resume or (0, first_seed(seed))
    while done < count:
        render_freq = args.get("render_freq", 0)
        args["render_freq"] = 0  # no viewer while the expert is checked
        try:
            env.setup_demo(now_ep_num=done, seed=now_seed, is_test=True, **args)
            info = env.play_once()
            feasible, reason = bool(env.plan_success and env.check_success()), "the scripted expert fails"
        except checkout.unstable_error as e:
            feasible, reason = False, f"unstable scene: {e}"
        except Exception as e:  # upstream skips a seed whatever breaks while the expert plays it
            feasible, reason = False, f"the expert run raised {type(e).__name__}: {e}"
        finally:
            args["render_freq"] = render_freq
            env.close_env()
        if not feasible:
            if on_skip:
                on_skip(now_seed, reason)
            now_seed += 1
            continue
        env.setup_demo(now_ep_num=done, seed=now_seed, is_test=True, **args)
        try:
            prompt = checkout.instruction(task, info, count)
            env.set_instruction(instruction=prompt)
            yield Trial(done, now_seed, RoboTwinEpisode(env, prompt, max_steps))
        finally:
            env.close_env(clear_cache=(done + 1) % max(1, int(args.get("clear_cache_freq", 1))) == 0)
        done += 1
        now_seed += 1
