"""AdamW over fp32 master copies of a bf16 model, for DeepSpeed without ZeRO partitioning (stage 0).

DeepSpeed's bf16 optimizers keep the same fp32 masters but move every gradient through flat
buffers with per-tensor loops and a host synchronisation; on one GPU that is about 250 ms per
step for the 5 B robotwin model (bench/train_step.py). Here a step is a handful of multi-tensor
kernels: bf16 gradients into fp32 buffers, one fused AdamW over the masters, masters back into the
bf16 weights. Parameters that are already fp32 (the modulation path) are their own masters.

The fp32 copies of the gradients live in one buffer of `chunk_numel` elements, reused chunk by
chunk of the masters (torch's AdamW steps only parameters that hold a gradient): a whole-model fp32
gradient would cost 4 bytes per parameter, 19 GiB at 5 B, the activations of a second sample.
"""

from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float, fused: bool,
                 chunk_numel: int = 2**28):
        params = list(params)
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})
        if len(self.param_groups) != 1:
            raise ValueError("MasterWeightAdamW takes one parameter group")
        self.low = [p for p in params if p.dtype != torch.float32]
        self.full = [p for p in params if p.dtype == torch.float32]
        self.low_masters = [p.detach().float() for p in self.low]
        # Consecutive masters of at most chunk_numel elements (a larger tensor alone), and their
        # views into the one fp32 gradient buffer.
        self.chunks: list[tuple[int, int]] = []
        start, size = 0, 0
        for i, p in enumerate(self.low):
            if size and size + p.numel() > chunk_numel:
                self.chunks.append((start, i))
                start, size = i, 0
            size += p.numel()
        if self.low:
            self.chunks.append((start, len(self.low)))
        largest = max((sum(p.numel() for p in self.low[a:b]) for a, b in self.chunks), default=0)
        device = self.low[0].device if self.low else "cpu"
        buffer = torch.empty(largest, dtype=torch.float32, device=device)
        self.grad_views: list[torch.Tensor] = []
        for a, b in self.chunks:
            offset = 0
            for p in self.low[a:b]:
                self.grad_views.append(buffer[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        masters = iter(self.low_masters)
        self.adamw = torch.optim.AdamW([next(masters) if p.dtype != torch.float32 else p for p in params],
                                       lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW does not take a closure")
        grads = [p.grad for p in self.low]
        if any(g is None for g in grads):
            raise RuntimeError("every bf16 parameter needs a gradient before the optimizer step")
        self.adamw.param_groups[0]["lr"] = self.param_groups[0]["lr"]  # the LR schedule steps this group
        full_grads = [p.grad for p in self.full]
        for p in self.full:
            p.grad = None  # stepped once, after the chunks
        for a, b in self.chunks:
            masters, views = self.low_masters[a:b], self.grad_views[a:b]
            torch._foreach_copy_(views, grads[a:b])
            for m, v in zip(masters, views):
                m.grad = v
            self.adamw.step()  # only the masters holding a gradient: this chunk's
            for m in masters:
                m.grad = None
            torch._foreach_copy_(self.low[a:b], masters)
        for p, g in zip(self.full, full_grads):
            p.grad = g
        if any(g is not None for g in full_grads):
            self.adamw.step()

    def state_dict(self) -> dict:
        return {"outer": super().state_dict(), "adamw": self.adamw.state_dict(), "masters": self.low_masters}

    def load_state_dict(self, state: dict) -> None:
        saved = state["masters"]
        if len(saved) != len(self.low_masters):
            raise ValueError(f"optimizer state holds {len(saved)} fp32 masters, the model has {len(self.low_masters)}")
        super().load_state_dict(state["outer"])
        self.adamw.load_state_dict(state["adamw"])
        with torch.no_grad():
            torch._foreach_copy_(self.low_masters, [s.to(m.device) for s, m in zip(saved, self.low_masters)])
