"""The robot-facing policy: camera images and robot-unit actions in, robot-unit actions out.

It wraps the inference engine with what the reference server does around it: the VAE turns
images into the preset's latent layout, the text encoder embeds the instruction (and "" for
guidance), and actions move between the robot's used channels in physical units and the
model's 30 quantile-normalised channels. One `Policy` is one episode stream; policies built
from the same `PolicyWeights` share the weights and own only their caches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
import torch

from .batch import BatchingEngine, ChunkBatcher
from .config import Preset
from .cuda_graphs import StreamClaim
from .engine import Chunk, EngineConfig, InferenceEngine
from .fp8 import FP8Linear, quantize_blocks_fp8
from .observation import ObservationEncoder
from .text_encoder import TextEncoder
from .transformer import LingBotVATransformer
from .vae import serve_on_gpu

NORM_EPS = 1e-6

_R = TypeVar("_R")


# CUDA stream priorities (lower first). A robot waits for its act's and observation's round trips, while a
# chunk computed ahead has the executing chunk's time to finish (0.64 s for 32 actions at 50 Hz): on a GPU
# shared by several robots, the blocks of their requests start before those of chunks computed ahead.
REQUEST_PRIORITY = -1
AHEAD_PRIORITY = 0


def _on_own_stream(ahead: bool = False) -> Callable[[Callable[..., _R]], Callable[..., _R]]:
    """Run a Policy method on the policy's CUDA stream for requests, or (`ahead`) on its stream for chunks
    computed ahead, after everything queued on the other (see `Policy.stream`)."""

    def wrap(method: Callable[..., _R]) -> Callable[..., _R]:
        @functools.wraps(method)
        def run(self: "Policy", *args, **kwargs) -> _R:
            if self.claim is None or self.ahead_claim is None:
                return method(self, *args, **kwargs)
            own, other = (self.ahead_claim, self.claim) if ahead else (self.claim, self.ahead_claim)
            # Both locks, requests' first: a stream shared past the pool's size is used by one policy at a time.
            with self.claim.lock, self.ahead_claim.lock, torch.cuda.stream(own.stream):
                own.stream.wait_stream(other.stream)
                return method(self, *args, **kwargs)

        return run

    return wrap


def normalize_actions(actions: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor) -> torch.Tensor:
    """Physical -> model space, per channel (channel dim first): (a - q01) / (q99 - q01 + eps) * 2 - 1."""
    shape = (-1,) + (1,) * (actions.dim() - 1)
    return (actions - q01.view(shape)) / (q99.view(shape) - q01.view(shape) + NORM_EPS) * 2 - 1


def denormalize_actions(actions: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (actions.dim() - 1)
    return (actions + 1) / 2 * (q99.view(shape) - q01.view(shape) + NORM_EPS) + q01.view(shape)


@dataclass
class PolicyWeights:
    """Everything loaded once and shared by every episode: the networks and the preset.

    On a GPU the transformer runs its fast path (bench/chunk_latency.py measures each part): fused
    q/k/v projections, compiled block regions, cuDNN and split-KV attention and CUDA graphs of the denoising steps;
    with a bf16 transformer, the VAE runs in bf16 too with its encoder compiled (models/vae.py `serve_on_gpu`).
    """

    preset: Preset
    transformer: LingBotVATransformer
    vae: torch.nn.Module
    text_encoder: TextEncoder
    backend: str | None = None  # default: "splitkv" on GPU (cuDNN, Triton split-KV for few queries), "sdpa" on CPU
    # Several robots' action steps due together run as one batch (models/batch.py); None: each alone.
    batcher: ChunkBatcher | None = None
    # Policies made so far: a policy's captured graphs hold the weights' addresses, so quantising (`use_fp8`)
    # after one was made would leave it reading freed memory.
    policies_made: int = field(default=0, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the transformer's weights are (and its policies' work runs)."""
        return self.transformer.patch_embedding_mlp.weight.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def fp8(self) -> bool:
        """Whether the block GEMMs run in FP8 (`use_fp8`)."""
        return any(isinstance(m, FP8Linear) for m in self.transformer.modules())

    def __post_init__(self) -> None:
        on_gpu = self.on_gpu
        if self.backend is None:
            self.backend = "splitkv" if on_gpu else "sdpa"
        if on_gpu:
            self.transformer.fuse_qkv_projections()
            self.transformer.compile_blocks()
            # Upstream runs its VAE and its text encoder in the transformer's dtype (param_dtype): bf16 here too,
            # not an fp32 run's. The text encoder (UMT5-XXL, 5.68 B parameters, used at resets only) then holds
            # 11.4 GB of the GPU instead of 22.7: room for more sessions (serving/sessions.py).
            if self.transformer.dtype == torch.bfloat16:
                if next(self.vae.parameters()).is_cuda:
                    serve_on_gpu(self.vae)
                if self.text_encoder.model.device.type == "cuda":
                    self.text_encoder.model.to(torch.bfloat16)

    def use_fp8(self) -> int:
        """Run the block GEMMs in FP8 (models/fp8.py): before the first policy is made, as its captured
        graphs hold the weights' addresses. Returns the Linears swapped. On a CPU, oneDNN runs the same FP8
        products, slower than bf16 (the small policy's act took 3.1x bf16's on 2 cores:
        bench/results/fp8_closed_loop_cpu.md): FP8's numbers for accuracy studies and tests, not its speed."""
        if self.fp8:
            return 0  # already quantised
        if self.policies_made:
            # a direct policy made before `vaops serve`'s quantisation replayed freed weights: CUDA illegal address
            raise RuntimeError(f"use_fp8 after {self.policies_made} policies were made from these weights: their "
                               "captured graphs read the bf16 weights it frees; quantise before making policies")
        if self.transformer.dtype != torch.bfloat16:
            raise ValueError(f"fp8 needs the transformer in bfloat16, it is {self.transformer.dtype}")
        if self.on_gpu:
            major, minor = torch.cuda.get_device_capability(self.device)
            if (major, minor) < (8, 9):
                raise ValueError(f"fp8 needs a GPU of compute capability 8.9 or later, this one is {major}.{minor}")
        return quantize_blocks_fp8(self.transformer)

    def new_policy(self) -> "Policy":
        self.policies_made += 1
        return Policy(self)


@dataclass
class PolicyChunk:
    actions: np.ndarray  # [n_used, FC, N] float32, robot units, in preset.used_action_channels order
    latents: torch.Tensor  # [1, C, FC, H, W] the imagined future (normalised latents)
    frame_offset: int


def allow_concurrent_policies() -> None:
    """Let several threads run policies at once (`vaops serve --compute-threads`, bench/concurrent_chunks.py).

    When one thread compiles a new shape (inductor traces it with FX, a process-wide flag), a compiled
    function called meanwhile from another thread raises "Detected that you are using FX to symbolically
    trace a dynamo-optimized function". Off that error, the call runs its uncompiled Python: the same
    operations, slower, for the few calls that meet a compilation (a CUDA graph captured meanwhile keeps
    those slower kernels). A server's warm-up compiles an episode's shapes before it reports ready."""
    torch._dynamo.config.error_on_nested_fx_trace = False


class Policy:
    """One episode stream. On a GPU without the chunk batcher, everything it runs goes to CUDA streams of
    its own (`stream`; `ahead_stream`, of lower priority, for act_ahead), so that several policies served at
    once (`vaops serve --compute-threads`) overlap on the GPU: one's compute-bound video passes beside
    another's action steps, which read the weights with a fraction of the GPU's SMs busy. Its results do not
    depend on what runs beside it (same kernels, in the same order: each method waits for the other stream's
    work first). Each public method returns with its GPU work done or ordered on its streams."""

    def __init__(self, weights: PolicyWeights):
        self.weights = weights
        self.claim: StreamClaim | None = None
        self.ahead_claim: StreamClaim | None = None
        if weights.on_gpu:
            self.claim = StreamClaim(weights.device, REQUEST_PRIORITY)
            self.ahead_claim = StreamClaim(weights.device, AHEAD_PRIORITY)
            for claim in (self.claim, self.ahead_claim):  # the weights were made on the current stream
                claim.stream.wait_stream(torch.cuda.current_stream())
        self._build(weights)

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream its requests run on (act_ahead runs on `ahead_stream`; batched action steps on the
        batcher's, models/batch.py); None on a CPU."""
        return None if self.claim is None else self.claim.stream

    @property
    def ahead_stream(self) -> torch.cuda.Stream | None:
        """The lower-priority CUDA stream of its chunks computed ahead (act_ahead)."""
        return None if self.ahead_claim is None else self.ahead_claim.stream

    @_on_own_stream()
    def _build(self, weights: PolicyWeights) -> None:
        preset = weights.preset
        self.preset = preset
        config = EngineConfig.from_preset(preset)
        backend = weights.backend
        if backend is None:
            raise RuntimeError("PolicyWeights chose no attention backend")  # __post_init__ does
        if weights.batcher is None:
            self.engine = InferenceEngine(weights.transformer, config, backend, cuda_graphs=True)
        else:
            self.engine = BatchingEngine(weights.transformer, config, backend, cuda_graphs=True,
                                         batcher=weights.batcher)
        self.observations = ObservationEncoder(weights.vae, preset)
        self.q01 = torch.tensor(preset.norm_q01, dtype=torch.float32)
        self.q99 = torch.tensor(preset.norm_q99, dtype=torch.float32)
        self.channels = list(preset.used_action_channels)
        self.first_latent: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self._empty_emb: torch.Tensor | None = None
        self.operating_point = "released"

    @property
    def frame_offset(self) -> int:
        return self.engine.frame_offset

    @property
    def observation_offset(self) -> int:
        """Frame offset of the chunk the next `observe` is for (see InferenceEngine.observation_offset)."""
        return self.engine.observation_offset

    @property
    def keyframe_interval(self) -> int:
        """Actions between two camera keyframes: each latent frame spans `frames_per_latent` frames."""
        return max(1, self.preset.action_per_frame // self.preset.frames_per_latent)

    @_on_own_stream()
    def reset(self, prompt: str, seed: int | None = None, operating_point: str | None = None,
              synchronous: bool = False) -> None:
        """Start an episode; `operating_point` names the sampling settings it runs with (policy.json
        `operating_points`; None: the policy's own `sampling`). `synchronous`: every chunk is observed
        before the next act, no act_ahead (InferenceEngine.reset)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        sampling = self.preset.sampling if operating_point is None else self.preset.operating_point(operating_point)
        if sampling != self.engine.config.sampling:
            self.engine.set_sampling(sampling)
        self.operating_point = operating_point or "released"
        text = self.weights.text_encoder
        with torch.no_grad():
            prompt_emb = text.encode([prompt])
            if self._empty_emb is None:
                self._empty_emb = text.empty_prompt_embedding()
        self.engine.reset(prompt_emb.float(), self._empty_emb.float(), synchronous)
        self.observations.reset()
        self.first_latent = None
        device = self.engine.device
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    @_on_own_stream()
    def act(self, images: Mapping[str, np.ndarray] | None = None) -> PolicyChunk:
        """Next chunk of actions. The first chunk of an episode needs the current camera images
        (`{camera key: uint8 [H, W, 3]}`); later chunks continue from the cache."""
        if self.engine.frame_offset == 0:
            if images is None:
                raise ValueError("the first chunk of an episode needs the camera images")
            with torch.no_grad():
                self.first_latent = self.observations.encode({k: np.asarray(v)[None] for k, v in images.items()})
        return self._robot_chunk(self.engine.act(
            first_latent=self.first_latent if self.engine.frame_offset == 0 else None, generator=self.generator))

    @_on_own_stream(ahead=True)
    def act_ahead(self, grounded: bool = False) -> PolicyChunk:
        """Asynchronous execution: the chunk after the one the robot is executing, computed before
        that one's observation arrives; the next `observe` (of the executing chunk) grounds both.
        `grounded`: first re-imagine the executing chunk from the latest observation and its actions,
        the paper's grounded variant (InferenceEngine.act_ahead)."""
        return self._robot_chunk(self.engine.act_ahead(generator=self.generator, grounded=grounded))

    @_on_own_stream()
    def warm_up(self) -> int:
        """Run each shape of an episode once, so that on a GPU compilation, cuDNN plans and CUDA graph
        capture happen here rather than in a robot's chunks: through the policy the first chunk, its
        observation, a chunk with the cache filling and a whole chunk's observation; then the engine
        runs every other level of the filling ring (a graph each, one denoising step per schedule)
        until it has evicted; then a chunk on the full ring at the session's settings; then a new
        episode's levels in grounded asynchronous execution; with a chunk batcher, a batch of each size. The policy
        is left reset, with no episode.
        Returns the number of chunks run through the policy."""
        preset = self.preset
        blank = {c.key: np.zeros((c.height, c.width, 3), np.uint8) for c in preset.cameras}
        executed = np.zeros((len(self.channels), preset.frame_chunk_size, preset.action_per_frame), np.float32)
        frames = preset.frame_chunk_size * preset.frames_per_latent
        self.reset("", seed=0)
        self.act(blank)
        self.observe([blank] * (frames - preset.frames_per_latent), executed)  # the first image is sent with act
        self.act()
        self.observe([blank] * frames, executed)
        self.engine.warm_up_cache_levels()
        self.act()
        # The grounded asynchronous mode's forward-dynamics passes read the cache at levels of their own.
        self.reset("", seed=0)
        self.act(blank)
        self.engine.warm_up_cache_levels(grounded=True)
        if isinstance(self.engine, BatchingEngine):  # the batches' graphs, shared by every policy of the weights
            self.engine.batcher.warm_up(self.engine)
        self.reset("", seed=0)
        return 4

    def _robot_chunk(self, chunk: Chunk) -> PolicyChunk:
        actions = denormalize_actions(chunk.actions[0, ..., 0].cpu(), self.q01, self.q99)[self.channels]
        return PolicyChunk(actions.numpy().astype(np.float32), chunk.video, chunk.frame_offset)

    @_on_own_stream()
    def observe(self, keyframes: Sequence[Mapping[str, np.ndarray]], executed_actions: np.ndarray) -> None:
        """Write what happened (see `_observe`), on the stream of requests: a robot waits for it."""
        self._observe(keyframes, executed_actions)

    @_on_own_stream(ahead=True)
    def observe_ahead(self, keyframes: Sequence[Mapping[str, np.ndarray]], executed_actions: np.ndarray) -> None:
        """`observe` on the stream of chunks computed ahead: an observation the robot does not wait for, observed
        as the next chunk ahead starts (serving/episode.py `EpisodeService.defer_observations`), so it yields the
        GPU to other robots' requests as that chunk does."""
        self._observe(keyframes, executed_actions)

    def _observe(self, keyframes: Sequence[Mapping[str, np.ndarray]], executed_actions: np.ndarray) -> None:
        """Write what happened: camera keyframes taken every `keyframe_interval` actions (the first
        chunk's first latent frame is the initial image, so it is not sent again) and the executed
        actions `[n_used, F, N]` in robot units. With a chunk computed ahead, this is the observation
        of the chunk before it, all `frame_chunk_size` latent frames of it."""
        executed = np.asarray(executed_actions, dtype=np.float32)
        n_used, n = len(self.channels), self.preset.action_per_frame
        if executed.ndim != 3 or executed.shape[0] != n_used or executed.shape[2] != n:
            raise ValueError(f"executed actions must be [{n_used}, F, {n}], got {list(executed.shape)}")
        if not np.isfinite(executed).all():
            raise ValueError("executed actions contain NaN or inf")
        frames = executed.shape[1]
        if self.engine.ahead is not None and frames != self.preset.frame_chunk_size:
            raise ValueError(f"with a chunk computed ahead, the executed actions must cover the executing chunk's "
                             f"{self.preset.frame_chunk_size} latent frames, got {frames}")
        start = self.observation_offset == 0
        if start and self.first_latent is None:
            raise RuntimeError("observe before the first act of the episode")
        # Checked before encoding: the streaming VAE state must not advance on a rejected call.
        expected = (frames - (1 if start else 0)) * self.preset.frames_per_latent
        if len(keyframes) != expected:
            raise ValueError(f"{len(keyframes)} keyframes for {frames} executed latent frames; expected {expected} "
                             f"({self.preset.frames_per_latent} per latent frame"
                             + (", the first frame being the initial image)" if start else ")"))
        latents = [self.first_latent] if start else []
        if keyframes:
            stacked = {key: np.stack([np.asarray(k[key]) for k in keyframes])
                       for key in (c.key for c in self.preset.cameras)
                       if all(key in k for k in keyframes)}
            with torch.no_grad():
                latents.append(self.observations.encode(stacked))
        video = torch.cat(latents, dim=2)
        model_actions = torch.zeros((self.weights.transformer.config.action_dim, frames, n))
        model_actions[self.channels] = torch.from_numpy(executed)
        model_actions = normalize_actions(model_actions, self.q01, self.q99)
        self.engine.observe(video, model_actions[None, ..., None])

    @_on_own_stream()
    def imagine(self, latents: torch.Tensor) -> np.ndarray:
        """Decode predicted latents into one uint8 video of the whole camera layout."""
        with torch.no_grad():
            return self.observations.decode_mosaic(latents)
