"""bench/train_step.py's parts that hold on CPU: the reference's FSDP2 recipe (the in-run baseline)
recomputes what it saved, the bench launches its workers as `vaops train` and its TrainJob are
launched and measures what the robotwin recipe ships, and its results carry the issue-14 ratios."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from vaops.components.train.cli import add_arguments, resolve_config, train_arguments
from vaops.components.train.config import SCALE_OUT_EXECUTION, TrainConfig, get_recipe
from vaops.components.train.distributed import init_distributed
from vaops.components.train.k8s import TRAIN_ENTRY, K8sSpec, torchrun_command, train_job
from vaops.components.train.objective import TeacherForcedModel, build_model
from vaops.models.config import get_preset

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"
TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _tiny_module(checkpointing: bool) -> TeacherForcedModel:
    torch.manual_seed(0)
    cfg = TrainConfig(preset="tiny", precision="bf16", attention="sdpa", activation_checkpointing=checkpointing)
    return TeacherForcedModel(build_model(cfg, TINY, None, bf16=True), "sdpa")


def _recompute_without_input_cast(monkeypatch) -> None:
    """FSDP2 as in torch <= 2.11 (the GPU nodes'): a unit's pre-forward hook skips its input cast while
    the unit is recomputed in backward (newer torch casts there too)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    cast = getattr(FSDPState, "_cast_forward_inputs", None)
    if cast is None:
        return  # this torch inlines the cast after the recompute check: it behaves so already

    def old(self, args, kwargs):
        if self._training_state == TrainingState.PRE_BACKWARD:
            return args, kwargs
        return cast(self, args, kwargs)

    monkeypatch.setattr(FSDPState, "_cast_forward_inputs", old)


def test_reference_fsdp2_recipe_recomputes_what_it_saved(bench, monkeypatch):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.utils.checkpoint import CheckpointError

    _recompute_without_input_cast(monkeypatch)
    info = init_distributed()
    x = bench.step_inputs(TINY, 1, 4, 2, 8, info.device)
    # The earlier baseline: the model's own checkpointing around FSDP units that cast their inputs
    # to bf16. The recomputation saw the fp32 rotary tables where the forward had saved bf16 ones.
    earlier = _tiny_module(checkpointing=True)
    earlier.float()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in earlier.transformer.blocks:
        for layer in (block.attn2.to_k, block.attn2.to_v, block.attn2.norm_k):
            fully_shard(layer, mp_policy=policy)
        fully_shard(block, mp_policy=policy)
    fully_shard(earlier, mp_policy=policy)
    with pytest.raises(CheckpointError, match="different metadata"):
        earlier(x)[0].backward()

    for every in (1, 2):  # full, half
        module = _tiny_module(checkpointing=False)
        bench.shard_like_reference(module, every)
        blocks = list(module.transformer.blocks)
        assert [isinstance(b, CheckpointWrapper) for b in blocks] == [i % every == 0 for i in range(len(blocks))]
        loss = module(x)[0]
        loss.backward()
        assert torch.isfinite(loss)
        # every parameter but the action embedder's text projection (in the checkpoints, never used)
        grads = {n: p.grad for n, p in module.named_parameters() if "condition_embedder_action.text" not in n}
        assert all(g is not None and torch.isfinite(g.full_tensor()).all() for g in grads.values()), [
            n for n, g in grads.items() if g is None]


def test_bench_launches_and_measures_what_vaops_train_ships(bench):
    """The bench's workers start under torchrun as the TrainJob's ranks do, and its `shipped`
    configuration is the robotwin recipe's execution (SCALE_OUT_EXECUTION), which the TrainJob runs."""
    shipped = bench.parse_config("shipped")
    args = argparse.Namespace(preset="robotwin", frames=8, chunk=2, window=64, steps=5, warmup=3, peak_tflops=989.0,
                              device="cuda", offload_optimizer=False, ds_override=None)
    cmd = bench.launch_command(args, shipped, 4)
    launcher = (sys.executable, "-m", "torch.distributed.run")
    assert cmd == torchrun_command(cmd[5:], no_python=False, nproc_per_node=4, standalone=True, launcher=launcher)
    assert cmd[5:7] == [str(BENCH), "--worker"] and cmd[cmd.index("--batch-sizes") + 1] == str(
        SCALE_OUT_EXECUTION["micro_batch"])
    # the samples the shipped execution caps its windows at, not --frames
    assert cmd[cmd.index("--frames") + 1] == str(SCALE_OUT_EXECUTION["max_latent_frames"]) == str(shipped.frames)

    recipe = get_recipe("robotwin")
    job = train_job(K8sSpec(nodes=2, gpus_per_node=8), train_arguments(recipe, "robotwin"))
    command = job["spec"]["trainer"]["command"]
    assert command == torchrun_command([*TRAIN_ENTRY, "--recipe", "robotwin"], no_python=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    trained = resolve_config(parser.parse_args(command[len(TRAIN_ENTRY) + 2:]))
    assert {k: getattr(trained, k) for k in SCALE_OUT_EXECUTION} == SCALE_OUT_EXECUTION
    assert (trained.zero_stage, trained.compile_blocks, trained.micro_batch) == (
        shipped.zero_stage, shipped.compile == "on", shipped.batches[0])
    assert (trained.activation_checkpointing, trained.checkpoint_every) == (
        shipped.ckpt != "off", max(1, bench.CKPT_EVERY[shipped.ckpt]))
    assert trained.max_latent_frames == shipped.frames
    assert bench.launch_command(args, bench.parse_config("z2:off:on:2"), 1)[cmd.index("--frames") + 1] == "8"


def test_configs_and_ratios(bench):
    assert bench.parse_config("z2:half:on:2+4") == bench.Config("z2", "half", "on", (2, 4))
    for bad, message in (("z3:off:on:1", "ZeRO <= 2"), ("z2:some:on:1", "ckpt must be"), ("z2:off:on", "ENGINE:")):
        with pytest.raises(ValueError, match=message):
            bench.parse_config(bad)
    jobs = bench.plan([bench.parse_config(c) for c in ("fsdp2:full:off:1", "z2:off:on:1", "z0:off:on:1")], [1, 2], 2,
                      serial=False)
    assert [(j.config.engine, j.gpus) for j in jobs] == [("fsdp2", 1), ("z2", 1), ("fsdp2", 2), ("z2", 2),
                                                         ("z0", 1), ("z0", 2)]

    def row(engine, gpus, per_gpu, mfu=0.3):
        return {"engine": engine, "zero_stage": None if engine == "fsdp2" else 2, "ckpt": "off", "compile": "on",
                "gpus": gpus, "batch": 1, "tokens_per_s_per_gpu": per_gpu, "mfu": mfu}

    oom = {k: v for k, v in row("z2", 4, 0.0).items() if k not in ("tokens_per_s_per_gpu", "mfu")} | {"error": "OOM"}
    rows, summary = bench.derive([row("fsdp2", 1, 6000.0), row("z2", 1, 10000.0), row("fsdp2", 2, 5000.0),
                                  row("z2", 2, 9500.0, mfu=0.41), oom])
    z2_two = rows[3]
    assert z2_two["x_fsdp2"] == pytest.approx(1.9) and z2_two["scaling"] == pytest.approx(0.95)
    assert z2_two["x_reference"] == pytest.approx(9500.0 / bench.REFERENCE_TOKENS_PER_S)
    assert summary["best"][2]["tokens_per_s_per_gpu"] == 9500.0 and "x_fsdp2" not in rows[4]
    assert summary["best"][2]["scaling_of_best"] == pytest.approx(0.95)
    assert summary["targets"] == {"per_gpu_1.5x_reference": {2: True}, "scaling_0.9": {2: True}, "mfu_0.4_any": True}
