"""DeepSpeed ZeRO set-up: process group, engine configuration, full weights for saving.

One code path for every launch: a plain process (world size 1, a private TCP rendezvous),
`deepspeed` and `torchrun` (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* in the environment). On a
machine without CUDA, DeepSpeed runs through its CPU accelerator over gloo, so CI exercises the
same engine as the GPU runs.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainConfig
from .master_weights import MasterWeightAdamW


def _select_accelerator() -> None:
    # DeepSpeed picks its accelerator once, at first use; it must be told before that on CPU machines.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


_select_accelerator()

import deepspeed  # noqa: E402

if not torch.cuda.is_available():
    # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (deepspeed_shm_comm) when a
    # process group starts: 1-2.5 min of C++ in a fresh virtualenv, rebuilt for every checkout path
    # that shares ~/.cache/torch_extensions. gloo's all-reduce serves the CPU runs (tiny presets).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the launcher's process group, or make a one-process group when there is no launcher."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            deepspeed.init_distributed(dist_backend=backend)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            deepspeed.init_distributed(dist_backend=backend)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def use_bf16(cfg: TrainConfig, info: DistInfo) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and info.cuda)


def deepspeed_config(cfg: TrainConfig, info: DistInfo) -> dict:
    zero: dict = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": info.cuda}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": info.cuda}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": info.cuda}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        # Without ZeRO the fp32 masters live in MasterWeightAdamW: DeepSpeed sees a plain model.
        "bf16": {"enabled": use_bf16(cfg, info) and cfg.zero_stage > 0},
        "zero_optimization": zero,
        # A torch AdamW (fused on GPU) is passed in; DeepSpeed's own CPU Adam only with offload.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def make_optimizer(params, cfg: TrainConfig, info: DistInfo) -> torch.optim.Optimizer:
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, adamw_mode=True)
    if cfg.zero_stage == 0 and use_bf16(cfg, info):
        return MasterWeightAdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=info.cuda)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=info.cuda)


def warmup_constant(warmup_steps: int):
    """LR factor for optimizer step s: linear warm-up over `warmup_steps`, then constant."""
    return lambda step: min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps else 1.0


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.1):
    """Linear warm-up, then a cosine from 1 down to `floor` at `total_steps` (training from scratch:
    the late, small steps are what make the actions precise)."""
    warm = warmup_constant(warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warm(step)
        done = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))

    return factor


def lr_factor(cfg: TrainConfig):
    return (warmup_cosine(cfg.warmup_steps, cfg.steps) if cfg.lr_schedule == "cosine"
            else warmup_constant(cfg.warmup_steps))


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, nested mappings key by key."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_engine(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo, external_params=(),
                 ds_overrides: dict | None = None):
    """DeepSpeed engine over `model`; `external_params` are parameters the model uses outside
    their owner's forward (ZeRO-3 must gather them for the wrapper's forward). `ds_overrides`
    (bench/train_step.py) merges into DeepSpeed's configuration, e.g. ZeRO bucket sizes."""
    if cfg.zero_stage == 3:
        for p in external_params:
            deepspeed.zero.register_external_parameter(model, p)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, info)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=merged(deepspeed_config(cfg, info), ds_overrides or {}),
                                           dist_init_required=False)
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on CPU, on rank 0 (None elsewhere); all ranks must call it."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def pre_step_grad_norm(engine) -> float | None:
    """The gradient norm where DeepSpeed does not record it (ZeRO stage 0): read on the accumulation
    boundary before `engine.step()` clips and clears the (already averaged) gradients, in fp32
    whatever the gradients' dtype. Elsewhere None: `engine.get_global_grad_norm()` after the step has it."""
    if (engine.zero_optimization() or engine.bfloat16_enabled()
            or not engine.is_gradient_accumulation_boundary()):
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))))


def all_mean(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().clone().float()
    if dist.get_world_size() > 1:
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def all_sum(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return float(t.item())


def broadcast_object(values: list) -> None:
    """Rank 0's `values` (picklable) into every rank's list, in place."""
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)


def barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()
