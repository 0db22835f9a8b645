"""The Wan2.2 video VAE (diffusers' `AutoencoderKLWan`): building, loading, saving, latent
normalisation and causal streaming encoding.

The model side of LingBot-VA only ever sees normalised latents `(mu - latents_mean) / latents_std`
with the statistics stored in the VAE's own `config.json`; the robot's camera frames arrive a
few at a time, so encoding keeps the VAE's causal-convolution cache between calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from torch.nn.modules.utils import _triple

from vaops.models.config import VAEConfig

from .atomic import read_json, write_folder_atomically

VAE_SUBFOLDER = "vae"
_VAE_CLASS_NAME = "AutoencoderKLWan"
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")

# diffusers is imported where a VAE is made: importing it costs ~3 s of CPU a process, which every
# simulator, evaluation client and registry step paid through this module without using it.
if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan


def _constructor_kwargs(cfg: VAEConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def build_vae(cfg: VAEConfig, seed: int = 0) -> AutoencoderKLWan:
    """A randomly initialised VAE of the given sizes, deterministic in `seed`.

    Its latent statistics are drawn from the same seed (means in [-0.3, 0.3], stds in
    [0.4, 1.6], the range of the published Wan2.2 values) so that normalisation is exercised.
    """
    from diffusers import AutoencoderKLWan

    gen = torch.Generator().manual_seed(seed)
    mean = ((torch.rand(cfg.z_dim, generator=gen) - 0.5) * 0.6).tolist()
    std = (0.4 + torch.rand(cfg.z_dim, generator=gen) * 1.2).tolist()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            **_constructor_kwargs(cfg),
            latents_mean=[round(v, 4) for v in mean],
            latents_std=[round(v, 4) for v in std],
        )
    return vae.eval().requires_grad_(False)


def _check_vae_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: VAE folder does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: VAE config.json is missing")
    config = read_json(config_path, "VAE config.json")
    class_name = config.get("_class_name", _VAE_CLASS_NAME)
    if class_name != _VAE_CLASS_NAME:
        raise ValueError(f"{config_path}: _class_name is {class_name!r}, expected {_VAE_CLASS_NAME!r}")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{folder}: no VAE weights ({' or '.join(_WEIGHT_FILES)})")


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """Load a diffusers `vae/` folder (config.json + safetensors) from local disk only.

    Every parameter must come from the file: missing, unexpected or misshapen tensors fail
    with their names instead of being silently initialised at random.
    """
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    _check_vae_folder(folder)
    try:
        vae, info = AutoencoderKLWan.from_pretrained(
            folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True,
            output_loading_info=True)
    except Exception as e:  # re-raised naming the folder
        raise ValueError(f"{folder}: cannot load the VAE: {e}") from e
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        listed = "; ".join(f"{k}: {v}" for k, v in problems.items())
        raise ValueError(f"{folder}: VAE weights do not match its config.json ({listed})")
    return vae.to(device).eval().requires_grad_(False)


# Whether the VAE's encode and decode route a CPU's batch-1 3D convolutions to oneDNN (OneDNNConv3d);
# bench/encode.py turns it off for its same-run baseline.
ONEDNN_CPU_CONV3D = True
_CONV3D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV3D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class OneDNNConv3d(torch.overrides.TorchFunctionMode):
    """Within it, a float32 3D convolution of one sample on a CPU runs oneDNN's kernel.

    PyTorch sends such a convolution (3x3 kernels) to its slow im2col path unless N*C*D*H exceeds 20,480,
    a rule tuned for 2D convolutions (ATen's ConvUtils.h). Every level of the small preset's VAE sits just
    under it (1 sample x 32 channels x 6 frames x 96 rows = 18,432), where oneDNN is 7.7x faster (13
    against 102 ms for 32 channels at 96x128 on 2 cores). The results differ by float32 rounding (4e-7
    relative). Batches of two or more already take oneDNN's path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.conv3d and not torch.is_grad_enabled():
            call = {**_CONV3D_DEFAULTS, **dict(zip(_CONV3D_ARGS, args)), **kwargs}
            x = call["input"]
            if x.device.type == "cpu" and x.dtype == torch.float32 and x.size(0) == 1 \
                    and not isinstance(call["padding"], str):
                return torch.mkldnn_convolution(x.contiguous(), call["weight"], call["bias"],
                                                list(_triple(call["padding"])), list(_triple(call["stride"])),
                                                list(_triple(call["dilation"])), call["groups"])
        return func(*args, **kwargs)


def cpu_convolutions(device: torch.device) -> contextlib.AbstractContextManager:
    """OneDNNConv3d for a VAE on a CPU (when ONEDNN_CPU_CONV3D and PyTorch has oneDNN), else nothing."""
    if device.type == "cpu" and ONEDNN_CPU_CONV3D and torch.backends.mkldnn.is_available():
        return OneDNNConv3d()
    return contextlib.nullcontext()


def save_vae(vae: AutoencoderKLWan, folder: str | Path) -> Path:
    """Write `vae` as a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    return write_folder_atomically(folder, lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))


@torch.no_grad()
def fit_latent_stats(vae: AutoencoderKLWan, frames: torch.Tensor, batch: int = 32) -> tuple[list[float], list[float]]:
    """Set the VAE's `latents_mean/latents_std` to the per-channel mean and std of its latent means
    over `frames` `[N, 3, H, W]` in [-1, 1] (each encoded alone), and return them.

    A random VAE's config statistics are draws, not measurements: on the ALOHA demo frames the small
    preset's normalised latents had per-channel stds of 0.03-0.17 around offsets up to +-1, so the
    frame-to-frame signal was a few percent of flow matching's unit noise."""
    param = next(vae.parameters())
    mus = [vae.encode(frames[i:i + batch, :, None].to(param.device, param.dtype)).latent_dist.mean.float()
           for i in range(0, len(frames), batch)]
    mu = torch.cat(mus).transpose(0, 1).reshape(vae.config.z_dim, -1)
    mean = [round(v, 6) for v in mu.mean(1).tolist()]
    std = [round(max(v, 1e-6), 6) for v in mu.std(1).tolist()]
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return mean, std


def latent_stats(vae: AutoencoderKLWan) -> tuple[list[float], list[float]]:
    """The per-channel `(latents_mean, latents_std)` stored in the VAE's config."""
    return list(vae.config.latents_mean), list(vae.config.latents_std)


def normalize_latents(mu: torch.Tensor, latents_mean: Sequence[float],
                      latents_std: Sequence[float]) -> torch.Tensor:
    """`(mu - mean) / std` per channel of `mu [B, C, F, H, W]`.

    Computed as upstream does (fp32, multiplying by the fp32 reciprocal of std, result cast
    back to `mu`'s dtype) so bf16 latents match the released data bit for bit.
    """
    mean = torch.tensor(latents_mean, dtype=torch.float32, device=mu.device).view(1, -1, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(latents_std, dtype=torch.float32, device=mu.device)).view(1, -1, 1, 1, 1)
    return ((mu.float() - mean) * inv_std).to(mu.dtype)


def denormalize_latents(latents: torch.Tensor, latents_mean: Sequence[float],
                        latents_std: Sequence[float]) -> torch.Tensor:
    """Inverse of `normalize_latents`, in the latents' own dtype as upstream decodes."""
    kw = dict(dtype=latents.dtype, device=latents.device)
    mean = torch.tensor(latents_mean, **kw).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(latents_std, **kw).view(1, -1, 1, 1, 1)
    return latents / inv_std + mean


def serve_on_gpu(vae: AutoencoderKLWan, backend: str = "inductor") -> AutoencoderKLWan:
    """The served VAE on a GPU: in bf16, as upstream's server runs it (its `param_dtype`), with the 3D
    convolutions' weights channels-last and the encoder compiled (its norms, activations and causal-cache
    slices fused around cuDNN's convolutions). One H200, an observation's encode (8 keyframes x 3 cameras):
    42.5 ms in fp32 as before, 41.0 in bf16, 35.5 compiled in fp32, 23.4 this way, with the latents 6.3e-3
    from fp32's (rel L2; bf16 alone 8.6e-3): bench/results/pass_anatomy_fp8attn_observe_h200.json. The first
    encodes of each shape compile (the server's warm-up runs them). `backend`: torch.compile's (CPU tests trace
    the same graphs with "eager", without inductor's C++ builds)."""
    vae.to(torch.bfloat16)
    for conv in (m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)):
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    # The first piece after a reset, the later ones, per camera group: more variants than dynamo's default 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    vae.encoder.compile(dynamic=False, backend=backend)
    return vae


@torch.no_grad()
def decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents `[B, C, F, h, w]` -> video `[B, 3, 1 + 4(F-1), 16h, 16w]` in [-1, 1]."""
    param = next(vae.parameters())
    z = denormalize_latents(latents.to(device=param.device, dtype=param.dtype), *latent_stats(vae))
    with cpu_convolutions(param.device):
        return vae.decode(z).sample


class StreamingEncoder:
    """Causal chunk-by-chunk encoding with the VAE's convolution cache kept between calls.

    The first call after `reset()` takes `1 + 4k` frames, every later call `4k` frames; the
    latent means concatenated over calls equal `vae.encode(whole clip).latent_dist.mean`,
    because the clip is fed to the encoder in exactly the pieces `AutoencoderKLWan._encode`
    uses (the first frame alone, then groups of `scale_factor_temporal` frames).
    """

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        self._step = vae.config.scale_factor_temporal
        self.reset()

    def reset(self) -> None:
        """Forget the previous clip (start of an episode)."""
        self._cache: list = [None] * self.vae._cached_conv_counts["encoder"]
        self.frames_seen = 0

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Video `[B, 3, T, H, W]` in [-1, 1] -> latent means `[B, C, T // 4 (+1 first), H/16, W/16]`."""
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [B, 3, T, H, W], got shape {tuple(frames.shape)}")
        num = frames.shape[2]
        first = self.frames_seen == 0
        if first and num % self._step != 1:
            raise ValueError(f"the first chunk after reset() needs 1 + {self._step}k frames, got {num}")
        if not first and (num == 0 or num % self._step != 0):
            raise ValueError(f"chunks after the first need {self._step}k frames (k >= 1), got {num}")
        param = next(self.vae.parameters())
        x = frames.to(device=param.device, dtype=param.dtype)
        if self.vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

            x = patchify(x, patch_size=self.vae.config.patch_size)
        start = 1 if first else 0
        pieces = [x[:, :, :1]] if first else []
        pieces += [x[:, :, t:t + self._step] for t in range(start, num, self._step)]
        with cpu_convolutions(param.device):
            outs = [self.vae.encoder(piece, feat_cache=self._cache, feat_idx=[0]) for piece in pieces]
        self.frames_seen += num
        enc = self.vae.quant_conv(torch.cat(outs, dim=2))
        return enc[:, : self.vae.config.z_dim]
