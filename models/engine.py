"""The inference engine: the reference server loop as `reset / act / observe`.

Everything here is in the model's normalised space: latents as the VAE wrapper normalises them,
actions as the policy's quantile normalisation maps them. `act` denoises one chunk of video then
actions (classifier-free guidance on a doubled batch), writing the chunk's final t=0 pass into the
KV cache as *predicted* entries; `observe` replaces those by what really happened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import grid_ids
from .config import Preset, SamplingConfig, check_operating_point
from .cuda_graphs import CapturedCall
from .flow_matching import Schedule
from .kv_cache import CachedSelfAttention, KVCache
from .transformer import LingBotVATransformer, TextContext

# Captured graphs per engine. An episode at the robotwin preset captures 109: while the ring fills,
# 36 video levels (CFG batch of two) and 35 action levels, each for the steps' batch of one and the
# cache pass's two (106); 3 on the full ring. The observation pass after an eviction reads the packed
# ring (KVCache._pack) as the last filling level's observation does, with its graph. Grounded
# asynchronous execution's forward-dynamics passes add 71 (2 a filling level, 1 masked). 110 took 0.57 GiB
# on one H200 (their inputs, outputs and shared pool; the KV cache is 7.2 GB). Observations
# of other lengths add shapes: past this bound a new shape runs eagerly, with the same reads, so graph
# memory stays bounded.
MAX_GRAPHS = 256


@dataclass(frozen=True)
class EngineConfig:
    frame_chunk_size: int
    action_per_frame: int
    latent_height: int
    latent_width: int
    used_action_channels: tuple[int, ...]
    sampling: SamplingConfig

    @classmethod
    def from_preset(cls, preset: Preset) -> "EngineConfig":
        h, w = preset.latent_hw
        return cls(preset.frame_chunk_size, preset.action_per_frame, h, w,
                   tuple(preset.used_action_channels), preset.sampling)


@dataclass
class Chunk:
    video: torch.Tensor  # [1, C, FC, H, W] predicted latents (normalised)
    actions: torch.Tensor  # [1, A, FC, N, 1] predicted actions (normalised, unused channels zero)
    frame_offset: int
    # A truncated video schedule returns `video` stepped once past its final level (as upstream returns it), but its
    # final pass wrote the latents at that level into the cache, at timestep `cached_t`: these, which a rewrite of
    # the chunk's entries writes again (InferenceEngine._write_chunk). None: `video` itself, at t = 0.
    cached_video: torch.Tensor | None = None
    cached_t: float = 0.0


def denoise(forward: Callable[[torch.Tensor, torch.Tensor, bool, bool], torch.Tensor], x: torch.Tensor,
            schedule: Schedule, guidance: float, first: torch.Tensor | None, first_rows: torch.Tensor | slice,
            mask: torch.Tensor | None, skip_unguided: bool, cache_last: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euler over the schedule for x's rows (one per episode), then one pass at its final level (t=0 unless
    truncated) that writes the chunk as predicted entries; a truncated schedule steps the returned latents once
    more. `forward(x, t, last, cond_only)` runs a pass and returns its predictions, CFG's two rows (conditional
    first) per row of x, or the conditional one where `cond_only`: the steps of an unguided schedule when
    `skip_unguided`. `first`: the first frame of the rows `first_rows` (an episode's first chunk), held fixed
    at t = 0; `mask`: the action channels in use. `cache_last=False` skips the final pass when nothing uses it
    (an untruncated schedule's last pass only writes the cache). Returns the latents and, for a truncated
    schedule, those its final pass read (and wrote into the cache) at the final level."""
    n, fc = x.shape[0], x.shape[2]
    deltas = schedule.deltas()
    steps = schedule.timesteps.tolist()
    guided = guidance > 1
    final = None
    for i, t in enumerate(steps + [schedule.final_timestep]):
        last = i == len(steps)
        if last and not cache_last and schedule.after is None:
            break
        if first is not None:
            x[first_rows, :, :1] = first
        if mask is not None:
            x = x * mask
        tvec = torch.full((n, fc), t, device=x.device)
        if first is not None:
            tvec[first_rows, 0] = 0
        pred = forward(x, tvec, last, not last and not guided and skip_unguided)
        if last and schedule.after is None:
            break
        if last:
            final = x  # not written to again: the step below makes a new tensor
        pred = pred.unflatten(0, (n, -1))
        v = pred[:, 1] + guidance * (pred[:, 0] - pred[:, 1]) if guided else pred[:, 0]
        x = x + v * (schedule.last_step() if last else deltas[i])
        if first is not None:
            x[first_rows, :, :1] = first
    return x, final


class InferenceEngine:
    """Speed options (results stay the same):
    `cuda_graphs`: replay the fixed-shape denoising steps as CUDA graphs (GPU only);
    `skip_unguided_uncond`: a guidance scale of 1 needs no unconditional branch while denoising."""

    def __init__(self, transformer: LingBotVATransformer, config: EngineConfig, backend: str = "sdpa",
                 cuda_graphs: bool = False, skip_unguided_uncond: bool = True):
        self.model = transformer
        self.config = config
        self.backend = backend
        cfg = transformer.config
        self.device = transformer.patch_embedding_mlp.weight.device
        self.dtype = transformer.dtype
        # A multiplicative float mask: boolean indexing would synchronise with the device.
        self.action_mask = torch.zeros(1, cfg.action_dim, 1, 1, 1, device=self.device)
        self.action_mask[:, list(config.used_action_channels)] = 1.0
        s = config.sampling
        self._schedules(s)
        self.batch = 2 if s.use_cfg else 1
        self.video_tokens = config.frame_chunk_size * transformer.video_tokens_per_frame(
            config.latent_height, config.latent_width)
        self.action_tokens = config.frame_chunk_size * config.action_per_frame
        self.cache: KVCache | None = None
        self.text: TextContext | None = None
        self.frame_offset = 0
        # Graph steps read the cache at fixed addresses (KVCache.static_extent: the live prefix while
        # the ring fills, the whole ring once full); on CPU the same reads run eagerly, which is how the
        # tests check them.
        self.static_reads = cuda_graphs
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.skip_unguided_uncond = skip_unguided_uncond
        self._graphs: dict[tuple, CapturedCall] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._slots = {kind: torch.zeros(max(self.video_tokens, self.action_tokens), dtype=torch.long,
                                         device=self.device) for kind in ("video", "action")}
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ahead: Chunk | None = None
        # The chunk the robot executes when it was computed ahead (its cached video is a stale forecast:
        # imagined before the observation that preceded it); None after a synchronous act.
        self._executing: Chunk | None = None
        self.grounded: Chunk | None = None  # the executing chunk as the last grounded act_ahead re-imagined it
        # The chunk computed ahead whose predicted entries the last observe dropped and that are not yet written
        # again after the observation (`_write_unwritten`).
        self._unwritten: Chunk | None = None
        # The episode observes every chunk before the next act (reset(synchronous=True)), so a chunk's
        # predicted actions are dropped unread and their cache pass is skipped.
        self.synchronous = False

    # ----- episode -----
    def _schedules(self, s: SamplingConfig) -> None:
        self.video_schedule = Schedule.make(s.video_steps, s.video_shift, s.video_exec_step, s.video_stop)
        self.action_schedule = Schedule.make(s.action_steps, s.action_shift)

    def set_sampling(self, s: SamplingConfig) -> None:
        """Sample the next episodes with other steps, shifts, guidance values or truncation; the cache
        (its window, and its batch of two under CFG) stays as it is, so those two must not change."""
        check_operating_point("requested", s, self.config.sampling)
        self.config = dataclasses.replace(self.config, sampling=s)
        self._schedules(s)

    def reset(self, prompt_emb: torch.Tensor, negative_emb: torch.Tensor | None = None,
              synchronous: bool = False) -> None:
        """Start an episode: clear the cache and project the prompt (and "" for CFG) once.

        `synchronous`: every chunk will be observed before the next act (no act_ahead, no advance). The
        pass that caches a chunk's predicted actions is then skipped: the observation replaces them
        before anything reads them, so the chunks are the same, one action pass sooner (the CFG batch:
        0.144 -> 0.138 s a chunk at the paper's operating point on one H200, bf16)."""
        if prompt_emb.dim() != 3 or prompt_emb.shape[0] != 1:
            raise ValueError(f"prompt_emb must be [1, L, D], got {tuple(prompt_emb.shape)}")
        text = prompt_emb
        if self.batch == 2:
            if negative_emb is None:
                raise ValueError("guidance > 1 needs the negative (empty) prompt embedding")
            text = torch.cat([prompt_emb, negative_emb.to(prompt_emb)], dim=0)
        cfg = self.model.config
        if self.cache is None:
            self.cache = KVCache.for_window(cfg.num_layers, self.batch, self.config.sampling.attn_window,
                                            self.video_tokens, self.action_tokens, cfg.num_attention_heads,
                                            cfg.attention_head_dim, self.dtype, self.device)
        self.cache.clear()
        with torch.no_grad():
            text = self.model.text_context(text.to(self.device))
        if self.text is not None and all(a.shape == b.shape for (a, _), (b, _) in zip(self.text.kv, text.kv)):
            # In place, so captured CUDA graphs keep reading the right addresses.
            for (k, v), (nk, nv) in zip(self.text.kv, text.kv):
                k.copy_(nk)
                v.copy_(nv)
        else:
            self.text = text
            self._graphs.clear()
        self.frame_offset = 0
        self._ahead = self._executing = self.grounded = self._unwritten = None
        self.synchronous = synchronous

    @property
    def ahead(self) -> Chunk | None:
        """The chunk computed by `act_ahead` that the next `observe` grounds, if any."""
        return self._ahead

    @property
    def observation_offset(self) -> int:
        """Frame offset the next `observe` writes at: the executing chunk's, which is the one before the
        chunk computed ahead when there is one."""
        return self.frame_offset if self._ahead is None else self._ahead.frame_offset - self.config.frame_chunk_size

    @property
    def live_cache(self) -> KVCache:
        """The episode's cache (reset allocates it)."""
        if self.cache is None:
            raise RuntimeError("call reset(prompt_emb) before act/observe")
        return self.cache

    @property
    def live_text(self) -> TextContext:
        """The episode's prompt (reset projects it)."""
        if self.text is None:
            raise RuntimeError("call reset(prompt_emb) before act/observe")
        return self.text

    def _require_episode(self) -> None:
        """Raise unless reset has run (the live_cache and live_text properties check)."""
        _ = self.live_cache, self.live_text

    # ----- one forward over new tokens against the cache -----
    def _rope(self, kind: str, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (kind, frames, height, width, self.frame_offset)
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            grid = grid_ids(frames, height, width, self.frame_offset, action=kind == "action", device=self.device)
            self._rope_cache[key] = self.model.rope(grid)
        return self._rope_cache[key]

    def _pass(self, kind: str, x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], int, int, int]:
        """A pass's forward function and its token grid (frames, height, width) for input `x`."""
        f = x.shape[2]
        if kind == "video":
            _, ph, pw = self.model.config.patch_size
            return self.model.forward_video, f, x.shape[3] // ph, x.shape[4] // pw
        return self.model.forward_actions, f, x.shape[3], x.shape[4]

    def _forward(self, kind: str, x: torch.Tensor, t: torch.Tensor, keep: bool, predicted: bool,
                 cond_only: bool) -> torch.Tensor:
        batch = slice(0, 1) if cond_only else slice(None)
        n = 1 if cond_only else self.batch
        fn, f, h, w = self._pass(kind, x)
        cos, sin = self._rope(kind, f, h, w)
        pending = self.live_cache.begin(f * h * w, keep=keep, predicted=predicted, slots_out=self._slots[kind])
        text = self.live_text.select(batch) if cond_only else self.live_text

        def run(x: torch.Tensor, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            attn = CachedSelfAttention(self.live_cache, pending, batch, self.backend, static=self.static_reads)
            return fn(x, t, (cos, sin), text, attn, self.backend).float()

        x = x.expand(n, *x.shape[1:]).to(self.dtype)
        t = t.expand(n, -1)
        graph = self._graph(kind, n, x, run, [x, t, cos, sin]) if self.cuda_graphs else None
        out = run(x, t, cos, sin) if graph is None else graph(x, t, cos, sin)
        self.live_cache.end(pending)
        return out

    def _graph(self, kind: str, n: int, x: torch.Tensor, run, inputs: list[torch.Tensor]) -> CapturedCall | None:
        """This step's captured graph, captured on first use; None past MAX_GRAPHS (run it eagerly).
        Keyed by what fixes its shapes and addresses: the tokens, the batch and the cache read's extent."""
        key = (kind, n, tuple(x.shape), self.live_cache.static_extent())
        if key not in self._graphs and len(self._graphs) < MAX_GRAPHS:
            self._graphs[key] = CapturedCall(run, inputs, pool=self._graph_pool, label=f"engine {key}")
        return self._graphs.get(key)

    def _denoise(self, kind: str, x: torch.Tensor, schedule: Schedule, guidance: float,
                 first: torch.Tensor | None, cache_last: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`denoise` for this engine's one row: its passes, its action mask."""
        def forward(x: torch.Tensor, t: torch.Tensor, last: bool, cond_only: bool) -> torch.Tensor:
            return self._forward(kind, x, t, keep=last, predicted=last, cond_only=cond_only)

        return denoise(forward, x, schedule, guidance, first, slice(None),
                       self.action_mask if kind == "action" else None,
                       self.batch == 2 and self.skip_unguided_uncond, cache_last)

    @torch.no_grad()
    def act(self, first_latent: torch.Tensor | None = None, video_noise: torch.Tensor | None = None,
            action_noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> Chunk:
        """Predict the next chunk. At frame offset 0, `first_latent` [1, C, 1, H, W] (the encoded first
        observation) is required and held fixed; noise is injected or drawn from `generator`."""
        self._require_episode()
        if self._ahead is not None:
            raise RuntimeError("a chunk was computed ahead: observe the executing chunk before acting again")
        self._write_unwritten()
        self._executing = None
        return self._act(first_latent, video_noise, action_noise, generator)

    @torch.no_grad()
    def act_ahead(self, video_noise: torch.Tensor | None = None, action_noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, grounded: bool = False,
                  ground_noise: torch.Tensor | None = None) -> Chunk:
        """Asynchronous execution: predict the chunk after the one the robot is executing, from that
        chunk's predicted entries, before its observation arrives. The next `observe` grounds both:
        the executing chunk's entries become what was observed and this chunk's are rewritten after them.
        This chunk takes its place in the window meanwhile, so once the cache is full the grounding pass
        sees one chunk less of history than the synchronous loop's observe does.

        `grounded`: the paper's grounded asynchronous execution (section 3.4, Algorithm 2). When the
        executing chunk was itself computed ahead, its cached video is a stale forecast, imagined before
        the observation now in the cache; it is first re-imagined (see `_reimagine_executing`, noise
        `ground_noise` or drawn from `generator` before this chunk's) and this chunk is predicted after
        that. Without it (naive) this chunk continues the stale forecast. After a synchronous act the
        executing chunk was imagined from the latest observation already and both are the same."""
        self._require_episode()
        if self.synchronous:
            raise RuntimeError("this episode was reset as synchronous: each chunk is observed before the next act")
        if self._ahead is not None or (self.live_cache.predicted_from is None and self._unwritten is None):
            raise RuntimeError("act_ahead follows an act (or a grounded observe) whose chunk is being executed")
        if grounded and self._executing is not None:
            self._unwritten = None  # the grounding pass drops the executing chunk's predicted entries first
            self._reimagine_executing(ground_noise, generator)
        self._write_unwritten()
        self.frame_offset += self.config.frame_chunk_size
        self._ahead = self._act(None, video_noise, action_noise, generator, ahead=True)
        return self._ahead

    def _reimagine_executing(self, noise: torch.Tensor | None, generator: torch.Generator | None) -> None:
        """The grounding pass (a forward-dynamics pass) for the executing chunk at `frame_offset`, after
        the observation before it: its stale predicted entries are dropped; its actions (what the robot
        executes) are written at t=0 after the observed history; its video is denoised from noise over
        the video schedule attending to that history and those actions; then the chunk is cached as a
        synchronous act would have left it, the new video then its actions at t=0 (as `observe` rewrites
        a chunk computed ahead), so the next chunk reads [observed history, re-imagined video, executed
        actions]. The paper post-trains with a forward-dynamics loss for the video-reads-its-own-actions
        step; a model trained without one (the teacher-forced mask never shows a chunk's video its own
        actions) runs it out of distribution. Writes at most one chunk beyond the history, so it evicts
        nothing the naive path keeps."""
        executing = self._executing
        if executing is None:
            raise RuntimeError("no chunk computed ahead is executing")
        c = self.config
        vshape = (1, self.model.config.in_channels, c.frame_chunk_size, c.latent_height, c.latent_width)
        video = self._noise(noise, vshape, generator, "ground_noise")
        self.live_cache.drop_predicted()
        zeros = torch.zeros(1, c.frame_chunk_size, device=self.device)
        self._forward("action", executing.actions, zeros, keep=True, predicted=True, cond_only=False)
        # Its final pass would only write predicted entries that are dropped next (untruncated schedules).
        video, cached = self._denoise("video", video, self.video_schedule, c.sampling.guidance_scale, None,
                                      cache_last=False)
        self.live_cache.drop_predicted()
        self.grounded = self._video_chunk(video, cached, executing.actions)
        self._write_chunk(self.grounded)
        self._executing = None

    def _act(self, first_latent: torch.Tensor | None, video_noise: torch.Tensor | None,
             action_noise: torch.Tensor | None, generator: torch.Generator | None, ahead: bool = False) -> Chunk:
        return self._denoise_chunk(*self._chunk_inputs(first_latent, video_noise, action_noise, generator),
                                   cache_actions=self.caches_actions(ahead))

    def caches_actions(self, ahead: bool) -> bool:
        """Whether a chunk's predicted actions are written into the cache (its action schedule's last pass):
        only the next act_ahead reads them. A synchronous episode observes every chunk first, and a chunk
        computed ahead is rewritten after the observation before it (`observe`), so theirs are dropped unread.
        Skipping that pass of the CFG batch took a synchronous chunk 0.144 -> 0.138 s at the paper's operating
        point (robotwin preset, one H200, bf16); a chunk computed ahead saves the same pass."""
        return not (self.synchronous or ahead)

    def _chunk_inputs(self, first_latent: torch.Tensor | None, video_noise: torch.Tensor | None,
                      action_noise: torch.Tensor | None, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A chunk's initial video and action noise (drawn in that order) and, at an episode's first
        chunk, its first latent frame, checked."""
        c = self.config
        mcfg = self.model.config
        start = self.frame_offset == 0
        if start and first_latent is None:
            raise ValueError("the first chunk needs first_latent, the encoded first observation")
        vshape = (1, mcfg.in_channels, c.frame_chunk_size, c.latent_height, c.latent_width)
        ashape = (1, mcfg.action_dim, c.frame_chunk_size, c.action_per_frame, 1)
        video = self._noise(video_noise, vshape, generator, "video_noise")
        actions = self._noise(action_noise, ashape, generator, "action_noise")
        first = first_latent.to(self.device, torch.float32) if start and first_latent is not None else None
        if first is not None and tuple(first.shape) != vshape[:2] + (1,) + vshape[3:]:
            raise ValueError(f"first_latent must be {vshape[:2] + (1,) + vshape[3:]}, got {tuple(first.shape)}")
        return video, actions, first

    def _denoise_chunk(self, video: torch.Tensor, actions: torch.Tensor, first: torch.Tensor | None,
                       cache_actions: bool = True) -> Chunk:
        video, cached = self._denoise("video", video, self.video_schedule, self.config.sampling.guidance_scale, first)
        return self._video_chunk(video, cached, self._denoise_actions(actions, first is not None, cache_actions))

    def _denoise_actions(self, actions: torch.Tensor, first: bool, cache_actions: bool) -> torch.Tensor:
        """A chunk's action phase, after its video: its actions, masked. `first`: an episode's first chunk, whose
        first action frame is held at zero. (models/batch.py runs it for several robots at once.)"""
        zero_first = torch.zeros_like(actions[:, :, :1]) if first else None
        actions, _ = self._denoise("action", actions, self.action_schedule, self.config.sampling.action_guidance_scale,
                                   zero_first, cache_last=cache_actions)
        return actions * self.action_mask

    def _video_chunk(self, video: torch.Tensor, cached: torch.Tensor | None, actions: torch.Tensor) -> Chunk:
        """A chunk at the current offset; `cached`: its video as a truncated schedule's final pass wrote it."""
        return Chunk(video, actions, self.frame_offset, cached,
                     self.video_schedule.final_timestep if cached is not None else 0.0)

    @torch.no_grad()
    def observe(self, latents: torch.Tensor, actions: torch.Tensor) -> None:
        """Replace the predicted entries by the observed latents [1, C, F, H, W] and the executed
        actions [1, A, F, N, 1] (at t=0, at the current offset), then advance by F frames.

        After `act_ahead`, the observation is of the chunk before the one computed ahead: that chunk's
        predicted entries are written again after the observed ones, as its final pass wrote them, by the
        next operation that reads them (`_write_unwritten`)."""
        self._require_episode()
        c = self.config
        mcfg = self.model.config
        f = latents.shape[2]
        expect_v = (1, mcfg.in_channels, f, c.latent_height, c.latent_width)
        expect_a = (1, mcfg.action_dim, f, c.action_per_frame, 1)
        if tuple(latents.shape) != expect_v:
            raise ValueError(f"observed latents must be {expect_v}, got {tuple(latents.shape)}")
        if tuple(actions.shape) != expect_a:
            raise ValueError(f"observed actions must be {expect_a}, got {tuple(actions.shape)}")
        ahead = self._ahead
        if ahead is not None and f != c.frame_chunk_size:
            raise ValueError(f"with a chunk computed ahead, the observation must cover the executing chunk's "
                             f"{c.frame_chunk_size} frames, got {f}")
        self.frame_offset, self._ahead, self._unwritten = self.observation_offset, None, None
        self.live_cache.drop_predicted()
        self._write(latents.to(self.device, torch.float32), actions.to(self.device, torch.float32), predicted=False)
        self.frame_offset += f
        self._executing = self._unwritten = ahead

    def _write_unwritten(self) -> None:
        """After an observation, the chunk computed ahead is written again after it (`observe`): by the next
        operation that reads it, not by the observe, so an observation costs its own two passes only (a robot
        may wait for it; the next act_ahead runs while the robot executes), and a grounded act_ahead, which
        drops those entries first (`_reimagine_executing`), skips the write."""
        if self._unwritten is not None:
            chunk, self._unwritten = self._unwritten, None
            self._write_chunk(chunk)

    def _write_chunk(self, chunk: Chunk) -> None:
        """A predicted chunk's entries as its final passes wrote them: the video at its schedule's final level (a
        truncated schedule's latents there, at that timestep: what the chunk's own action passes read, not the
        video stepped past it to t = 0), then the actions at t = 0."""
        video = chunk.video if chunk.cached_video is None else chunk.cached_video
        self._write(video, chunk.actions, predicted=True, video_t=chunk.cached_t)

    def _write(self, video: torch.Tensor, actions: torch.Tensor, predicted: bool, video_t: float = 0.0) -> None:
        """A chunk's video entries at timestep `video_t`, then its actions' at t = 0."""
        level = torch.full((1, video.shape[2]), video_t, device=self.device)
        self._forward("video", video, level, keep=True, predicted=predicted, cond_only=False)
        zeros = torch.zeros(1, actions.shape[2], device=self.device)
        self._forward("action", actions * self.action_mask, zeros, keep=True, predicted=predicted, cond_only=False)

    def advance(self) -> None:
        """Continue from the imagined chunk instead of an observation (image-to-video-action
        generation): its predicted entries stay in the cache as context."""
        self._require_episode()
        if self.synchronous:
            raise RuntimeError("this episode was reset as synchronous: its chunks' actions were not cached")
        if self._ahead is not None:
            raise RuntimeError("a chunk was computed ahead: observe the executing chunk first")
        self._write_unwritten()
        self.live_cache.predicted_from = None
        self._executing = None
        self.frame_offset += self.config.frame_chunk_size

    @torch.no_grad()
    def warm_up_cache_levels(self, grounded: bool = False) -> int:
        """Warm-up: from an observed chunk, act and observe (zeros) until the ring has evicted, so each
        read of an episode runs once: every filling level, the full ring and the observation pass after an
        eviction. On a GPU their graphs are captured here rather than in the first episode's
        chunks (robotwin preset: up to 36 chunks, 3 graphs each while filling; 20 s on one H200 with
        the blocks uncompiled). `grounded` (after an episode's first act): the same levels through
        grounded asynchronous execution (act_ahead(grounded=True), then the executing chunk's
        observation), whose forward-dynamics passes read the cache at levels of their own. The graphs'
        shapes do not depend on the number of steps, so each schedule runs one step; the session's
        settings are restored. The cache is left holding zeros: reset before an episode. Returns the
        chunks run."""
        self._require_episode()
        if grounded:  # as an episode's asynchronous loop: from its first act on
            if self._ahead is not None or self.live_cache.predicted_from is None:
                raise RuntimeError("a grounded warm_up_cache_levels starts after an act")
        elif self.frame_offset == 0 or self.live_cache.predicted_from is not None or self._ahead is not None:
            raise RuntimeError("warm_up_cache_levels starts after an observe, with no chunk awaiting one")
        session = self.config.sampling
        # Guidance stays: it decides which batches (1 or 2) the steps run, hence the graphs' shapes.
        self.set_sampling(dataclasses.replace(session, video_steps=1, action_steps=1, video_exec_step=-1,
                                              video_stop=0.0))
        generator = torch.Generator(device=self.device).manual_seed(0)  # leaves the global RNG alone
        chunks = 0
        try:
            evicted = False
            while not evicted:
                if grounded:
                    chunk = self.act_ahead(generator=generator, grounded=True)
                else:
                    chunk = self._act(None, None, None, generator)
                evicted = self.live_cache.head > 0
                self.observe(torch.zeros_like(chunk.video), torch.zeros_like(chunk.actions))
                chunks += 1
        finally:
            self.set_sampling(session)
        return chunks

    def _noise(self, given: torch.Tensor | None, shape: tuple[int, ...], generator: torch.Generator | None,
               name: str) -> torch.Tensor:
        if given is not None:
            if tuple(given.shape) != shape:
                raise ValueError(f"{name} must be {shape}, got {tuple(given.shape)}")
            return given.to(self.device, torch.float32).clone()
        gen_device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=gen_device).to(self.device)
