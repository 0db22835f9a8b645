"""Flow matching: sampling schedules, the 1000-step training table, its loss weights, noising.

`x_t = (1 - s) x0 + s e`, the network predicts the velocity `e - x0`, timestep = 1000 * s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Shifted sigmas of an Euler sampler with `steps` steps, from 1 down to (excluding) 0."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1)[:-1], shift)


@dataclass(frozen=True)
class TrainTable:
    sigmas: torch.Tensor  # [1000], descending
    timesteps: torch.Tensor  # [1000], 1000 * sigmas
    weights: torch.Tensor  # [1000], loss weight per entry, mean 1

    def to(self, device: torch.device | str) -> TrainTable:
        return TrainTable(self.sigmas.to(device), self.timesteps.to(device), self.weights.to(device))


def train_table(shift: float, n: int = NUM_TRAIN_TIMESTEPS) -> TrainTable:
    sigmas = sampling_sigmas(n, shift)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    # A Gaussian bump centred on the middle of the timestep range, floored at 0 and scaled to mean 1.
    bump = torch.exp(-2 * ((timesteps - n / 2) / n) ** 2)
    bump = bump - bump.min()
    return TrainTable(sigmas, timesteps, bump * (n / bump.sum()))


def unshift_sigma(sigma: float, shift: float) -> float:
    """The unshifted position whose shifted sigma is `sigma` (inverse of shift_sigmas)."""
    return sigma / (shift - (shift - 1) * sigma)


@dataclass(frozen=True)
class Schedule:
    """A sampling schedule plus the final pass that writes the chunk into the KV cache.

    The Euler steps start at `sigmas` and end at `final`, where the cache pass runs (0 for the full
    schedule). A truncated schedule also steps the returned latents once more, from `final` to
    `after`, with that pass's velocity (as upstream does for its imagined video)."""

    sigmas: torch.Tensor  # [steps]
    final: float = 0.0
    after: float | None = None

    @classmethod
    def make(cls, steps: int, shift: float, exec_step: int = -1, stop: float = 0.0) -> "Schedule":
        """`exec_step` k: the first k passes of the full schedule (upstream's `video_exec_step`: its
        timesteps padded with 0, then `[:k]`). `stop`: the `steps` steps go from 1 to this sigma."""
        if stop > 0:
            u = torch.linspace(1.0, unshift_sigma(stop, shift), steps + 1)
            return cls(shift_sigmas(u[:-1], shift), final=stop, after=0.0)
        sigmas = sampling_sigmas(steps, shift)
        if exec_step in (-1, steps + 1):
            return cls(sigmas)
        full = sigmas.tolist() + [0.0]
        return cls(sigmas[:exec_step - 1], final=full[exec_step - 1], after=full[exec_step])

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sigmas * NUM_TRAIN_TIMESTEPS

    @property
    def final_timestep(self) -> float:
        return self.final * NUM_TRAIN_TIMESTEPS

    def last_step(self) -> float:
        """The truncated schedule's extra step, from `final` to `after`."""
        if self.after is None:
            raise ValueError("a full schedule takes no step after its final pass")
        return self.after - self.final

    def deltas(self) -> list[float]:
        """Euler step sizes `sigma_next - sigma`, the last one going to `final`."""
        s = self.sigmas.tolist() + [self.final]
        return [s[i + 1] - s[i] for i in range(len(s) - 1)]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def sample_frame_indices(batch: int, frames: int, generator: torch.Generator | None = None,
                         low: int = 0, high: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """One training-table index per latent frame, uniform in [low, high), on the generator's device."""
    device = generator.device if generator is not None else None
    return torch.randint(low, high, (batch, frames), generator=generator, device=device)


def frame_weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over frames of (per-frame mean squared error x that frame's table weight).

    pred/target: [B, C, F, ...]; weights: [B, F]; mask (optional, broadcastable to pred): 1 where
    the channel is used, so unused action channels neither count nor dilute the mean.
    """
    err = (pred.float() - target.float()) ** 2
    reduce_dims = [d for d in range(err.ndim) if d not in (0, 2)]
    if mask is None:
        per_frame = err.mean(dim=reduce_dims)
    else:
        m = mask.float().expand_as(err)
        per_frame = (err * m).sum(dim=reduce_dims) / m.sum(dim=reduce_dims).clamp_min(1.0)
    return (per_frame * weights.float()).mean()
