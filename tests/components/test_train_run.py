"""Training runs through DeepSpeed (its CPU accelerator here): the loss falls, a killed run resumes
onto the uninterrupted curve, ZeRO stages agree, the checkpoint serves, MLflow has the run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from vaops.components.train.checkpointing import TrainerState, check_resumable, list_checkpoints
from vaops.components.train.cli import train_arguments
from vaops.components.train.config import TrainConfig, get_recipe
from vaops.components.train.synthetic import write_synthetic_latent_dataset
from vaops.components.train.trainer import run
from vaops.models.checkpoint import load_policy, read_preset, write_tiny_checkpoint
from vaops.models.config import get_preset
from vaops.models.engine import EngineConfig, InferenceEngine
from vaops.models.transformer import load_transformer

pytestmark = pytest.mark.xdist_group("train-run")

TINY = get_preset("tiny")
# 40 steps of 4 samples: long enough for the loss to fall, with checkpoints every 10 steps.
RUN = get_recipe("tiny").replace(steps=40, save_every=10, keep_last=2, micro_batch=4, lr=3e-3,
                                 system_metrics_interval=1.0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    threads = torch.get_num_threads()
    # The tiny model's ops are microseconds: more threads than free cores only add spin-waiting.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        dataset = write_synthetic_latent_dataset(root / "latents", TINY, episodes=4, latent_frames=4, seed=0)
        base = write_tiny_checkpoint(root / "base", seed=1)
        yield {"root": root, "uri": uri, "dataset": dataset, "base": base}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(workspace):
    cfg = RUN.replace(dataset=str(workspace["dataset"]), output=str(workspace["root"] / "reference"),
                      init_from=str(workspace["base"]))
    return cfg, run(cfg)


def _history(uri, run_id, key="loss"):
    latest = {}
    for m in MlflowClient(uri).get_metric_history(run_id, key):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return np.array([latest[s][1] for s in sorted(latest)]), sorted(latest)


def test_loss_falls(workspace, reference):
    _, out = reference
    loss, steps = _history(workspace["uri"], out.run_id)
    assert steps == list(range(1, 41))
    first, last = loss[:10].mean(), loss[-10:].mean()
    assert last < 0.8 * first, (first, last)
    action, _ = _history(workspace["uri"], out.run_id, "action_loss")
    assert action[-10:].mean() < 0.7 * action[:10].mean()


def test_killed_run_resumes_onto_the_uninterrupted_curve(workspace, reference):
    cfg, ref = reference
    output = workspace["root"] / "killed"
    cmd = [sys.executable, "-m", "vaops.pipelines.cli", "train",
           *train_arguments(cfg.replace(output=str(output), system_metrics=False), "tiny")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": workspace["uri"], "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=workspace["root"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (output / "checkpoints" / "step-00000020").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 20 in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(output)]
    assert 20 <= saved[-1] < 40, saved
    killed_run = json.loads((list_checkpoints(output)[-1] / "trainer_state.json").read_text())["run_id"]

    # Re-running the same configuration resumes (here in-process: the same code the command runs).
    resumed_out = run(cfg.replace(output=str(output), system_metrics=False))
    assert resumed_out.run_id == killed_run and resumed_out.steps == 40
    for key in ("loss", "video_loss", "action_loss"):
        resumed, steps = _history(workspace["uri"], killed_run, key)
        uninterrupted, _ = _history(workspace["uri"], ref.run_id, key)
        assert steps == list(range(1, 41))
        np.testing.assert_allclose(resumed, uninterrupted, rtol=0, atol=1e-6, err_msg=key)
    assert [p.name for p in list_checkpoints(output)] == ["step-00000030", "step-00000040"]  # keep_last=2
    with pytest.raises(ValueError, match="cannot resume, the run changed: micro_batch: 4 -> 2"):
        run(cfg.replace(output=str(output), micro_batch=2, steps=50))
    a = load_file(str(output / "checkpoints" / "step-00000040" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(Path(ref.checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in b)


def test_time_limited_launches_resume_onto_the_uninterrupted_curve(workspace, reference):
    cfg, ref = reference
    output = workspace["root"] / "limited"
    # A budget spent before the first step ends: the launch stops after it, at a checkpoint.
    first = run(cfg.replace(output=str(output), system_metrics=False, time_limit_min=1e-9))
    assert first.steps == 1 and [p.name for p in list_checkpoints(output)] == ["step-00000001"]
    second = run(cfg.replace(output=str(output), system_metrics=False, time_limit_min=30.0))
    assert second.run_id == first.run_id and second.steps == 40
    resumed, steps = _history(workspace["uri"], first.run_id)
    uninterrupted, _ = _history(workspace["uri"], ref.run_id)
    assert steps == list(range(1, 41))
    np.testing.assert_allclose(resumed, uninterrupted, rtol=0, atol=1e-6)


def test_checkpoint_loads_and_acts(workspace, reference):
    _, out = reference
    ckpt = Path(out.checkpoint)
    assert ckpt.name == "step-00000040"
    base = load_transformer(workspace["base"] / "transformer")
    model = load_transformer(ckpt / "transformer")
    assert not torch.equal(model.proj_out.weight, base.proj_out.weight)  # trained
    preset = read_preset(ckpt)
    stats = json.loads((workspace["dataset"] / "meta" / "norm_stats.json").read_text())
    assert list(preset.norm_q01) == stats["q01"] and list(preset.norm_q99) == stats["q99"]
    engine = InferenceEngine(model, EngineConfig.from_preset(preset))
    g = torch.Generator().manual_seed(0)
    engine.reset(torch.randn(1, 512, 40, generator=g), torch.zeros(1, 512, 40))
    chunk = engine.act(first_latent=torch.randn(1, 48, 1, 4, 6, generator=g), generator=g)
    assert chunk.video.shape == (1, 48, 2, 4, 6) and chunk.actions.shape == (1, 30, 2, 16, 1)
    assert torch.isfinite(chunk.video).all() and torch.isfinite(chunk.actions).all()
    policy = load_policy(ckpt)
    policy.reset("pick up the cube", seed=0)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    actions = policy.act({TINY.cameras[0].key: image}).actions
    assert actions.shape == (14, 2, 16) and np.isfinite(actions).all()


def test_mlflow_has_params_curves_system_metrics_and_artifacts(workspace, reference):
    cfg, out = reference
    client = MlflowClient(workspace["uri"])
    r = client.get_run(out.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["zero_stage"] == "2" and float(r.data.params["lr"]) == cfg.lr
    assert r.data.tags["vaops.stage"] == "train"
    for key in ("loss", "video_loss", "action_loss", "grad_norm", "lr", "tokens_per_s"):
        assert key in r.data.metrics, key
    assert any(k.startswith("system/") for k in r.data.metrics)
    lr, _ = _history(workspace["uri"], out.run_id, "lr")
    assert lr[0] < lr[1] == lr[-1] == pytest.approx(cfg.lr)  # warm-up, then constant
    checkpoint = {a.path for a in client.list_artifacts(out.run_id, "checkpoint")}
    assert {"checkpoint/transformer", "checkpoint/policy.json", "checkpoint/vae", "checkpoint/text_encoder",
            "checkpoint/tokenizer"} <= checkpoint
    assert "checkpoint/training" not in checkpoint  # no optimizer state in the model artifact
    report = {a.path for a in client.list_artifacts(out.run_id, "report")}
    assert {"report/curves.png", "report/report.md", "report/metrics.json"} <= report
    outputs = json.loads((Path(cfg.output) / "outputs.json").read_text())
    assert outputs["run_id"] == out.run_id and outputs["checkpoint"] == out.checkpoint


def test_zero_stages_and_accumulation_agree(workspace):
    base = get_recipe("tiny").replace(dataset=str(workspace["dataset"]), steps=3, micro_batch=2, grad_accum=2,
                                      save_every=3, system_metrics=False, log_checkpoints="none")
    curves, weights = {}, {}
    for stage in (2, 0, 1, 3):
        out = run(base.replace(zero_stage=stage, output=str(workspace["root"] / f"zero{stage}")))
        curves[stage], _ = _history(workspace["uri"], out.run_id)
        weights[stage] = load_file(str(Path(out.checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors"))
    for stage in (0, 1, 3):
        np.testing.assert_allclose(curves[stage], curves[2], rtol=1e-5, err_msg=f"stage {stage}")
        for k, v in weights[2].items():
            torch.testing.assert_close(weights[stage][k], v, atol=1e-5, rtol=1e-4)
    bf16 = run(base.replace(zero_stage=3, precision="bf16", output=str(workspace["root"] / "bf16")))
    loss, _ = _history(workspace["uri"], bf16.run_id)
    np.testing.assert_allclose(loss, curves[2], rtol=0.05)
    assert load_file(str(Path(bf16.checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors"))[
        "proj_out.weight"].dtype == torch.bfloat16
    assert load_transformer(Path(bf16.checkpoint) / "transformer").proj_out.weight.dtype == torch.float32
    bf16_weights = load_file(str(Path(bf16.checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors"))
    # Without ZeRO the fp32 masters live in MasterWeightAdamW instead of DeepSpeed: the same training.
    plain = run(base.replace(zero_stage=0, precision="bf16", output=str(workspace["root"] / "bf16-zero0")))
    plain_loss, _ = _history(workspace["uri"], plain.run_id)
    np.testing.assert_allclose(plain_loss, loss, rtol=0.02)
    plain_weights = load_file(str(Path(plain.checkpoint) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert plain_weights["proj_out.weight"].dtype == torch.bfloat16
    for k, v in bf16_weights.items():
        torch.testing.assert_close(plain_weights[k].float(), v.float(), atol=2e-2, rtol=2e-2)


def test_two_ranks_resume_exactly_with_the_scale_out_execution(workspace):
    """The execution `vaops train` ships for the 5 B recipes (SCALE_OUT_EXECUTION: no activation
    checkpointing, micro-batch 2, windows of at most max_latent_frames, bf16) on two ranks through the
    local-ranks launcher (torchrun, the TrainJob's entry point), with ZeRO-3 partitioning (the 2-GPU
    stage of bench/production_path.py) so that the saved weights are gathered from both ranks' shards:
    relaunched from its step-2 checkpoint, the run repeats steps 3-4 loss for loss and weight for weight,
    drawing the same windows. The workspace's segments are 4 latent frames: windows of 3 here (the
    shipped 16 would take them whole). Compiled blocks are a GPU matter and stay off here. (One test for
    both: each torchrun launch costs about a minute on 2 cores.)"""
    from vaops.components.train.config import SCALE_OUT_EXECUTION
    from vaops.components.train.launch import run_local_ranks

    output = workspace["root"] / "scale-out"
    cfg = get_recipe("tiny").replace(
        **{**SCALE_OUT_EXECUTION, "compile_blocks": False, "zero_stage": 3, "max_latent_frames": 3}).replace(
        dataset=str(workspace["dataset"]), output=str(output), steps=4, save_every=2, keep_last=2,
        precision="bf16", system_metrics=False, log_checkpoints="none", init_from=str(workspace["base"]))
    first = run_local_ranks(cfg, "tiny", 2)
    step4 = output / "checkpoints" / "step-00000004"
    weights = load_file(str(step4 / "transformer" / "diffusion_pytorch_model.safetensors"))
    state = json.loads((step4 / "trainer_state.json").read_text())
    assert state["world"] == 2 and state["micro_steps"] == 4  # per rank: 4 steps x 1 micro-batch (of 2 samples)
    assert state["config"]["zero_stage"] == 3
    ranks = sorted(p.name for p in (step4 / "training" / "state").iterdir())
    assert sum("optim_states" in name for name in ranks) == 2  # one ZeRO-3 optimizer shard per rank
    base = load_transformer(workspace["base"] / "transformer")
    trained = load_transformer(step4 / "transformer")
    assert not torch.equal(trained.proj_out.weight, base.proj_out.weight)  # gathered from both shards
    shutil.rmtree(step4)  # as if killed after the step-2 checkpoint
    again = run_local_ranks(cfg, "tiny", 2)
    assert again["run_id"] == first["run_id"] and again["steps"] == 4
    for key in ("loss", "video_loss", "action_loss"):
        logged: dict[int, list[float]] = {}
        for m in sorted(MlflowClient(workspace["uri"]).get_metric_history(first["run_id"], key),
                        key=lambda m: m.timestamp):
            logged.setdefault(m.step, []).append(m.value)
        assert sorted(logged) == [1, 2, 3, 4] and [len(logged[s]) for s in (3, 4)] == [2, 2], key
        for s in (3, 4):  # the first launch's value, then the relaunch's
            assert logged[s][0] == logged[s][1], (key, s, logged[s])
    resumed = load_file(str(step4 / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_bf16_without_zero_resumes_exactly(workspace):
    """ZeRO stage 0 in bf16 keeps its fp32 masters in the optimizer state: a run continued from its
    step-2 checkpoint must follow the straight run (the masters, not the bf16 weights, come back)."""
    base = get_recipe("tiny").replace(dataset=str(workspace["dataset"]), steps=4, save_every=2, zero_stage=0,
                                      precision="bf16", system_metrics=False, log_checkpoints="none")
    straight = run(base.replace(output=str(workspace["root"] / "zero0-straight")))
    first = run(base.replace(steps=2, output=str(workspace["root"] / "zero0-resumed")))
    resumed = run(base.replace(output=str(workspace["root"] / "zero0-resumed")))
    assert resumed.run_id == first.run_id
    expected, _ = _history(workspace["uri"], straight.run_id)
    got, steps = _history(workspace["uri"], resumed.run_id)
    assert steps == [1, 2, 3, 4]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_a_cosine_run_resumes_only_with_its_own_length(tmp_path):
    cosine = TrainConfig(lr_schedule="cosine", steps=100).to_dict()
    state = TrainerState(world=1, config=cosine)
    check_resumable(state, cosine, 1, tmp_path)
    with pytest.raises(ValueError, match="cannot resume, the run changed: steps: 100 -> 200"):
        check_resumable(state, {**cosine, "steps": 200}, 1, tmp_path)
    constant = TrainConfig(steps=100).to_dict()  # a constant LR may run longer on resume
    check_resumable(TrainerState(world=1, config=constant), {**constant, "steps": 200}, 1, tmp_path)
