"""`vaops run`: the pipeline on this machine with `kfp.local`, or `--host URL` on a Kubeflow
Pipelines cluster.

Locally every step is a process in this virtualenv (`SubprocessRunner(use_venv=False)`), its
outputs under `--root` (default outputs/pipeline), cached there: a rerun with the same inputs
skips the steps that already finished and resumes at the first that did not. A failing step
ends the run with one line: the step's name, its exception and the path of its full log.

The console shows one line when a step starts (`[7/12] train`, with its log) and one when it ends
or comes from the cache; everything a step prints (kfp's executor input, third-party banners,
progress bars) goes to its log file, <root>/logs/<step>.log (`--verbose` streams it as well),
but for its `vaops notice: ` lines, which the console shows under the step's name.
The train step keeps its checkpoints under <root>/train-runs, one folder per dataset, base model
and config: a rerun after an interruption resumes the training from its last checkpoint
(`[7/12] train: resuming from step N of M`) and a finished one is not trained again.
After the run, <root>/index.html links every stage's report (see reports.py).

Pipeline parameters are flags (`--demo-episodes 2`, `--train-config '{"steps": 10}'`).
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from vaops.components.tracebacks import clean, describe_failure
from vaops.models.codec import ConfigError, decode, flag

from .pipeline import (
    LOCAL,
    PIPELINE_NAME,
    STAGES,
    ClusterOptions,
    add_cluster_arguments,
    build_pipeline,
    cluster_options,
)

DEFAULT_ROOT = Path("outputs/pipeline")
LOGS = "logs"  # under the run's root: one file per step, <step>.log (<step>-2.log for a second task of that name)
# kfp.local's own lines (each step's start, end, outputs), module-qualified or not.
_EXECUTING = re.compile(r"Executing task '([\w-]+)'")
_FINISHED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
_CACHE_HIT = re.compile(r"Task '?([\w-]+)'? cache hit")
_KFP_LINE = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)? - [A-Z]+ - |^-{10,}$|^(Streamed logs:|Task '[\w-]+' )")
_NOTICE = re.compile(r"^vaops notice: (.+)$")  # a step's line for the console (the train step's resume)
TRAIN_RUNS = "train-runs"  # under the run's root: the train step's run folders (pipeline.train_work_root)
_STREAM_INDENT = " " * 4  # kfp.local indents the steps' own output by this much
_TYPES: dict[str, type] = {"String": str, "Integer": int, "Float": float, "Boolean": bool, "Dict": dict}


class PipelineFailed(RuntimeError):
    """A step failed; the one-line message names it, its error and its full log."""

    def __init__(self, step: str, reason: str, log: Path | None = None):
        reason = " ".join(reason.split("\n"))
        super().__init__(f"step {step!r} failed: {reason}" + (f" (full log: {log})" if log else ""))
        self.step = step
        self.reason = reason
        self.log = log


@dataclass
class LocalRun:
    outputs: dict[str, Any]  # the pipeline's outputs: artifacts (with .path) and values
    root: Path
    cached: list[str]  # steps served from the cache
    logs: list[tuple[str, Path]]  # (step, its log file) of the steps that ran, in order


def parameters() -> dict[str, tuple[str, Any]]:
    """The pipeline's parameters: name -> (kfp type name, default)."""
    return {name: (spec.type, spec.default) for name, spec in build_pipeline(LOCAL).component_spec.inputs.items()}


def decode_parameters(texts: dict[str, str]) -> dict[str, Any]:
    """Pipeline parameters from their flags' texts (YAML values: 3, 0.5, true, {"steps": 10}; a String
    as given), checked against their kfp types by the config codec."""
    kinds = {name: kind for name, (kind, _) in parameters().items()}
    fields = [(name, _TYPES[kind] | None, dataclasses.field(default=None)) for name, kind in kinds.items()]
    raw = {}
    for name, text in texts.items():
        try:
            raw[name] = text if kinds[name] == "String" else yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{flag(name)}: {text!r} is not a YAML/JSON value ({' '.join(str(e).split())})") from None
    spec = dataclasses.make_dataclass("PipelineParameters", fields, frozen=True)
    given: Any = decode(spec, raw, "pipeline parameters")
    return {name: getattr(given, name) for name in raw}


def _named(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
    return table[name]


def _stage_configs(p: dict[str, Any]) -> dict[str, Callable[[], object]]:
    """Each stage's config as its step builds it from the pipeline's parameters `p` (paths left out)."""
    from vaops.components.augment.config import PRESETS as AUGMENT
    from vaops.components.clean.config import PRESETS as CLEAN
    from vaops.components.demos.config import PRESETS as DEMOS
    from vaops.components.demos.config import for_model_preset
    from vaops.components.encode.adapter import get_robot
    from vaops.components.encode.config import EncodeConfig
    from vaops.components.evaluate.config import Shard, get_eval_preset
    from vaops.components.train.config import TrainConfig, get_recipe
    from vaops.models.config import RANDOM_INIT_PRESETS, get_preset

    def demos() -> object:
        base = DEMOS.get(p["preset"], DEMOS["default"])
        return for_model_preset(dataclasses.replace(
            base, episodes=p["demo_episodes"], task=p["demo_task"] or base.task,
            time_scale=p["demo_time_scale"] or base.time_scale, workers=p["demo_workers"] or base.workers), p["preset"])

    def base_model() -> object:
        if not p["base_checkpoint"] and p["preset"] not in RANDOM_INIT_PRESETS:
            raise ValueError(f"preset {p['preset']!r} needs base_checkpoint; only {', '.join(RANDOM_INIT_PRESETS)} "
                             f"start from random weights")
        return get_preset(p["preset"])

    def augment() -> object:
        cfg = _named(AUGMENT, p["augment_preset"], "augment preset")
        return dataclasses.replace(cfg, copies=p["augment_copies"]) if p["augment_copies"] >= 0 else cfg

    return {
        "dataset-source": (lambda: None) if p["dvc_repo"] else demos,
        "base-model": base_model,
        "clean": lambda: _named(CLEAN, p["clean_preset"], "clean preset"),
        "augment": augment,
        "encode": lambda: (get_robot(p["robot"]), EncodeConfig(model_preset=p["preset"], robot=p["robot"])),
        "train": lambda: TrainConfig.from_dict(p["train_config"], "--train-config", get_recipe(p["preset"])),
        "evaluate": lambda: get_eval_preset(p["eval_preset"], ".", episodes=p["eval_episodes"] or None,
                                            max_steps=p["eval_max_steps"] or None, shard=Shard(0, p["eval_shards"])),
    }


def check_stages(arguments: dict[str, Any]) -> None:
    """Decode and check every stage's config before the first step runs (a typo in --train-config
    would otherwise stop the run at the train step, after encode): ConfigError names the stage."""
    given = {name: default for name, (_, default) in parameters().items()} | arguments
    for stage, build in _stage_configs(given).items():
        try:
            build()
        except ValueError as e:
            raise ConfigError(f"stage {stage!r}: {e}") from None


class _StepLogs:
    """stdout that writes each step's part of it to the step's own log file (kfp.local streams
    every step's output into this one stream, indented), notes the steps served from the cache,
    and shows on the console one line per step's start and end (everything when `verbose`)."""

    def __init__(self, stream, folder: Path, verbose: bool = False):
        self.stream = stream
        self.folder = folder
        self.verbose = verbose
        self.logs: list[tuple[str, Path]] = []
        self.cached: list[str] = []
        self._file: TextIO | None = None
        self._pending = ""
        self._started: dict[str, float] = {}

    def write(self, text: str) -> int:
        # Lines arrive in pieces (kfp prints the indent, then the line): split only whole lines.
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(line)
        if self.verbose:
            self.stream.write(text)
        return len(text)

    def _say(self, step: str, text: str) -> None:
        if not self.verbose:
            k = STAGES.index(step) + 1 if step in STAGES else "?"
            self.stream.write(f"[{k}/{len(STAGES)}] {step}: {text}\n")
            self.stream.flush()

    def _line(self, raw: str) -> None:
        line = clean(raw)
        if m := _EXECUTING.search(line):
            self._open(m.group(1))
            self._started[m.group(1)] = time.monotonic()
            self._say(m.group(1), f"running (log {self.logs[-1][1]})")
        elif m := _CACHE_HIT.search(line):
            self.cached.append(m.group(1))
            self._say(m.group(1), "from the cache")
        if self._file is not None:
            own = raw[len(_STREAM_INDENT):] if raw.startswith(_STREAM_INDENT) else raw
            self._file.write(own + "\n")
            if m := _NOTICE.match(clean(own)):
                self._say(self.logs[-1][0], m.group(1))
            if m := _FINISHED.search(line):
                self.close()
                took = time.monotonic() - self._started.pop(m.group(1), time.monotonic())
                status = m.group(2).lower()
                self._say(m.group(1), f"done in {took:.0f} s" if status == "success" else status)

    def _open(self, step: str) -> None:
        self.close()
        taken = sum(1 for name, _ in self.logs if name == step)
        path = self.folder / (f"{step}.log" if not taken else f"{step}-{taken + 1}.log")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.logs.append((step, path))
        self._file = open(path, "w", buffering=1, errors="replace")

    def log_of(self, step: str) -> Path | None:
        """The log of the last task named `step` (a ParallelFor runs several)."""
        found = [path for name, path in self.logs if name == step]
        return found[-1] if found else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def failure(message: str, logs: _StepLogs) -> PipelineFailed:
    """The failed step (innermost), the exception its log ends with, and that log's path."""
    message = clean(message)
    chain = re.search(r"Inner task failed: (.*?)\.?$", message)
    steps = re.findall(r"'([^']+)'", chain.group(1)) if chain else []
    step = steps[0] if steps else "unknown"
    log = logs.log_of(step)
    lines = log.read_text(errors="replace").splitlines() if log is not None and log.is_file() else []
    reason = describe_failure(lines, skip=_KFP_LINE) or "it printed no error"
    return PipelineFailed(step, reason, log)


def run_local(arguments: dict[str, Any], root: Path = DEFAULT_ROOT, verbose: bool = False) -> LocalRun:
    """Run the pipeline with kfp.local; outputs and the step cache live under `root`; the console
    shows a line per step's start and end (`verbose`: everything the steps print)."""
    from kfp import local

    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    arguments = {"train_work_root": str(root / TRAIN_RUNS), **arguments}
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), enable_caching=True,
               raise_on_error=True)
    pipeline = build_pipeline(LOCAL)
    tee = _StepLogs(sys.stdout, root / LOGS, verbose)
    sys.stdout = tee  # kfp.local prints the steps' logs and its own there
    # kfp.local logs its cache hits outside its own logging setup: show them too.
    root_logger, hits = logging.getLogger(), logging.StreamHandler(tee)
    hits.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s", "%H:%M:%S"))
    level = root_logger.level
    root_logger.addHandler(hits)
    root_logger.setLevel(logging.INFO)
    # kfp.local runs independent steps in threads, each inside its `indented_print`, which swaps `builtins.print`
    # and puts back what it found: interleaved, they can leave an indenting print behind for the rest of the
    # process (`make test` at stop 37: later prints went through it and numba refused it as a global).
    original_print = builtins.print
    try:
        with warnings.catch_warnings():
            # Our images are Python images with the package installed, as this virtualenv is.
            warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
            task = pipeline(**arguments)
    except RuntimeError as e:
        if "Inner task failed" not in str(e):
            raise
        raise failure(str(e), tee) from None
    finally:
        builtins.print = original_print
        sys.stdout = tee.stream
        tee.close()
        root_logger.removeHandler(hits)
        root_logger.setLevel(level)
    return LocalRun(dict(task.outputs), root, tee.cached, tee.logs)


def submit(arguments: dict[str, Any], host: str, options: ClusterOptions, experiment: str = PIPELINE_NAME,
           namespace: str | None = None, run_name: str | None = None, token: str | None = None):
    """Submit the compiled pipeline to the Kubeflow Pipelines API at `host`; returns kfp's RunPipelineResult."""
    import kfp

    client = kfp.Client(host=host, namespace=namespace, existing_token=token)
    return client.create_run_from_pipeline_func(build_pipeline(options), arguments=arguments, run_name=run_name,
                                                experiment_name=experiment, namespace=namespace,
                                                enable_caching=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="Kubeflow Pipelines API URL: submit there instead of running locally (give "
                                       "--tracking-uri, or put it in the MLflow Secret, so the steps share a store)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="local runs: outputs and cache")
    parser.add_argument("--verbose", action="store_true", help="local runs: stream every step's output to the "
                                                             "console (always in <root>/logs/<step>.log)")
    remote = parser.add_argument_group("cluster runs (--host)")
    remote.add_argument("--experiment", default=PIPELINE_NAME)
    remote.add_argument("--namespace", help="Kubeflow profile namespace")
    remote.add_argument("--run-name")
    remote.add_argument("--token-env", default="KFP_TOKEN", help="variable holding a bearer token, if any")
    add_cluster_arguments(parser)
    params = parser.add_argument_group("pipeline parameters (default: the pipeline's)")
    for name, (kind, default) in parameters().items():
        shown = json.dumps(default) if kind == "Dict" else repr(default)
        params.add_argument(flag(name), dest=f"param_{name}", metavar=kind.upper(), help=f"default: {shown}")


def arguments_from(args: argparse.Namespace) -> dict[str, Any]:
    texts = {name: getattr(args, f"param_{name}") for name in parameters()}
    return decode_parameters({name: text for name, text in texts.items() if text is not None})


def main(args: argparse.Namespace) -> int:
    arguments = arguments_from(args)  # bad parameters (ConfigError): one line, exit 2 at the dispatcher
    check_stages(arguments)
    if args.host:
        result = submit(arguments, args.host, cluster_options(args), args.experiment, args.namespace, args.run_name,
                        os.environ.get(args.token_env) or None)
        print(f"submitted run {result.run_id} to {args.host} (experiment {args.experiment!r})")
        return 0
    from vaops.models.model_source import tracking_uri

    # One store for every step (each is its own process, maybe in another directory).
    arguments.setdefault("tracking_uri", tracking_uri())
    try:
        run = run_local(arguments, args.root, verbose=args.verbose)
    except PipelineFailed as e:
        print(f"vaops run: {e}", file=sys.stderr)
        return 1
    from .reports import write_index

    print(f"pipeline finished: outputs under {run.root}" + (f" ({len(run.cached)} steps from the cache)"
                                                            if run.cached else ""))
    for name in ("success_rate", "promoted"):
        print(f"  {name}: {run.outputs[name]}")
    print(f"  tracked in MLflow at {arguments['tracking_uri']}")
    pages = write_index(run.outputs, run.root)
    print("reports (open in a browser):")
    for name, page in pages.items():
        print(f"  {name:<13}{page}")
    return 0
