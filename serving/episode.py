"""The episode operations every protocol shares: input checks, then reset / act / observe on a
session's policy in a worker thread, timed for the metrics; in asynchronous execution also the
chunk computed ahead while the robot executes the current one.

Checks run before anything touches a session, so a bad request leaves the session as it was
(the streaming VAE and the KV cache only advance on valid input).

Retries are safe: a request may carry a sequence number (`seq`, increasing per session). A request
with the number of the session's last one is a retry: it gets that request's answer again without
computing anything (a chunk is never computed twice, an observation never written twice); an older
number, or the same number for another operation, is a conflict. Without numbers a second act before
the chunk's observation, or a second observation of one chunk, is a conflict too, never a double step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager

import numpy as np

from vaops.models.config import Preset
from vaops.models.policy import Policy, PolicyChunk

from . import metrics
from .sessions import Conflict, Session, SessionError, SessionManager

MAX_PROMPT_CHARS = 4096
MAX_IMAGE_SIDE = 4096
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class InputError(ValueError):
    """A request the server refuses; the message names the field and what was wrong."""


def check_prompt(prompt) -> str:
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("prompt is not valid UTF-8") from None
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}")
    return prompt


def check_count(name: str, value) -> int | None:
    """An optional non-negative 64-bit integer (a seed, a sequence number)."""
    if value is None:
        return None
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer in [0, 2^63), got {value!r}")
    if not 0 <= int(value) < 2**63:
        raise InputError(f"{name} {value} must be in [0, 2^63)")
    return int(value)


def check_image(name: str, image, frames: bool) -> np.ndarray:
    """uint8 `[H, W, 3]` (or `[T, H, W, 3]` when `frames`)."""
    layout = "[T, H, W, 3]" if frames else "[H, W, 3]"
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a uint8 array {layout}, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InputError(f"{name}: expected dtype uint8, got {image.dtype}")
    if image.ndim != (4 if frames else 3) or image.shape[-1] != 3:
        raise InputError(f"{name}: expected shape {layout}, got {list(image.shape)}")
    h, w = image.shape[-3:-1]
    if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE):
        raise InputError(f"{name}: image size {h}x{w} is outside 1..{MAX_IMAGE_SIDE}")
    if frames and image.shape[0] == 0:
        raise InputError(f"{name}: no frames")
    return image


def check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be true or false, got {value!r}")
    return bool(value)


# Asynchronous execution by name: `true` is the naive mode (the next chunk continues the executing
# chunk's forecast); "grounded" first re-imagines the executing chunk from the latest observation
# (Policy.act_ahead).
ASYNC_MODES = ("naive", "grounded")


def check_async_execution(value) -> bool | str:
    """false, true (naive) or a name of ASYNC_MODES: False, True or "grounded"."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value in ASYNC_MODES:
        return True if value == "naive" else value
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"async_execution must be true or false, got {value!r}; or a mode: "
                         f"{', '.join(map(repr, ASYNC_MODES))}")
    return bool(value)


def check_operating_point(value, preset: Preset) -> str | None:
    """None (the policy's own sampling) or one of the names in its policy.json `operating_points`."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    try:
        preset.operating_point(value)
    except (ValueError, TypeError):  # TypeError: an unhashable value (a list, a map)
        raise InputError(f"operating_point {value!r}: this model offers "
                         f"{', '.join(sorted(preset.operating_point_settings()))}") from None
    return value


def check_images(images, preset: Preset) -> dict[str, np.ndarray]:
    """One image per camera of the preset (other keys, e.g. observation.state, are ignored)."""
    if not isinstance(images, Mapping):
        raise InputError(f"observation must be a map of camera images, got {type(images).__name__}")
    missing = [c.key for c in preset.cameras if c.key not in images]
    if missing:
        raise InputError(f"observation lacks camera(s) {missing}; this model needs {[c.key for c in preset.cameras]}")
    return {c.key: check_image(c.key, images[c.key], frames=False) for c in preset.cameras}


def expected_keyframes(frame_offset: int, frames: int, preset: Preset) -> int:
    """Keyframes an observe of `frames` latent frames needs: the first chunk's first latent frame
    is the initial image the policy already holds."""
    return (frames - (1 if frame_offset == 0 else 0)) * preset.frames_per_latent


def check_actions(actions, preset: Preset, name: str = "actions") -> np.ndarray:
    """Executed actions `[n_used, F, N]` in robot units, 1 <= F <= frame_chunk_size, finite."""
    n_used, n = len(preset.used_action_channels), preset.action_per_frame
    if not isinstance(actions, np.ndarray):
        raise InputError(f"{name}: expected a float array [{n_used}, F, {n}], got {type(actions).__name__}")
    if actions.dtype.kind != "f":
        raise InputError(f"{name}: expected a float dtype, got {actions.dtype}")
    if actions.ndim != 3 or actions.shape[0] != n_used or actions.shape[2] != n:
        raise InputError(f"{name}: expected shape [{n_used}, F, {n}], got {list(actions.shape)}")
    if not 1 <= actions.shape[1] <= preset.frame_chunk_size:
        raise InputError(f"{name}: F = {actions.shape[1]} latent frames, expected 1..{preset.frame_chunk_size}")
    if not np.isfinite(actions).all():
        raise InputError(f"{name}: contains NaN or infinity")
    if np.abs(actions).max(initial=0.0) > _FLOAT32_MAX:
        raise InputError(f"{name}: values beyond the float32 range")
    return actions.astype(np.float32)


def check_keyframes(keyframes: Sequence[Mapping], count: int, preset: Preset) -> list[dict[str, np.ndarray]]:
    if not isinstance(keyframes, (list, tuple)):
        raise InputError(f"keyframes must be a list of observations, got {type(keyframes).__name__}")
    if len(keyframes) != count:
        raise InputError(f"got {len(keyframes)} keyframes, expected {count} "
                         f"({preset.frames_per_latent} per executed latent frame, none for the initial one)")
    out = []
    for i, frame in enumerate(keyframes):
        try:
            out.append(check_images(frame, preset))
        except InputError as e:
            raise InputError(f"keyframe {i}: {e}") from None
    if out:
        shapes = {k: {f[k].shape for f in out} for k in out[0]}
        mixed = [k for k, s in shapes.items() if len(s) > 1]
        if mixed:
            raise InputError(f"keyframes of camera(s) {mixed} differ in size")
    return out


class EpisodeFailed(RuntimeError):
    """An operation failed inside the policy: the episode's state is unknown, so it needs a reset."""


class AheadFailed(EpisodeFailed):
    """The chunk an asynchronous-execution session computed ahead failed: the episode needs a reset."""


_NEW = object()  # _replay's answer for a request that is not a retry


class EpisodeService:
    """Runs checked episode operations on sessions, one at a time per session.

    A session in asynchronous execution computes the next chunk in a worker thread as soon as an
    act has been answered, while the robot executes; the observe waits for it and is acknowledged (the
    policy observes it at the start of the next chunk computed ahead, see `defer_observations`), and
    the next act hands it out at once."""

    def __init__(self, sessions: SessionManager, executor: Executor, ahead_executor: Executor | None = None):
        self.sessions = sessions
        self.executor = executor
        # Chunks computed ahead, on threads of their own (ServeConfig.ahead_threads); None: on `executor`.
        self.ahead_executor = ahead_executor
        # In asynchronous execution an observation is checked and acknowledged at once, and the policy observes
        # it at the start of the next chunk computed ahead, the first thing that reads it: the chunk the robot
        # asks for next was computed before it. The robot's idle time between chunks is then two round trips,
        # not the observation's encoding and cache passes on a GPU shared with the other robots' chunks ahead.
        # The policy runs the same operations in the same order, the observation on the stream of chunks computed
        # ahead (`Policy.observe_ahead`). False: observed before the reply (ServeConfig.defer_observations sets it).
        self.defer_observations = True
        self.preset = sessions.weights.preset
        metrics.SESSION_CAPACITY.set(sessions.capacity)

    def open(self, session_id: str | None = None) -> Session:
        session = self.sessions.open(session_id)
        self.update_gauges()
        return session

    def close(self, session_id: str) -> None:
        self.sessions.close(session_id)
        self.update_gauges()

    def update_gauges(self) -> None:
        metrics.SESSIONS.set(len(self.sessions))
        metrics.CACHE_BYTES.set(self.sessions.total_cache_bytes())

    @asynccontextmanager
    async def _operation(self, session: Session, op: str, protocol: str):
        """One timed operation under the session's lock, so concurrent requests on one session queue up;
        checks inside it run against the session's state before anything changes it."""
        try:
            async with session.lock:
                start = time.perf_counter()
                try:
                    yield
                except (InputError, SessionError, EpisodeFailed):
                    raise  # refused before anything changed, or failed before already
                except Exception as e:  # inside the policy: its state is unknown until a reset
                    session.failure = f"the {op} failed: {type(e).__name__}: {e}"
                    session.pending = False
                    raise EpisodeFailed(f"{session.failure}; this episode cannot go on: send a reset") from e
                metrics.OP_SECONDS.labels(op, protocol).observe(time.perf_counter() - start)
                session.last_used = self.sessions.clock()
        finally:
            self.sessions.release(session)
            self.update_gauges()

    @staticmethod
    def _replay(session: Session, op: str, seq: int | None):
        """The recorded result when this request repeats the session's last numbered one, else _NEW."""
        if seq is None or session.seq is None or seq > session.seq:
            return _NEW
        if seq < session.seq:
            raise Conflict(f"seq {seq} is behind this session's last request (seq {session.seq}, {session.seq_op}): "
                           f"sequence numbers must increase; a retry repeats the last one")
        if op != session.seq_op:
            raise Conflict(f"seq {seq} was this session's {session.seq_op}; a {op} needs a new sequence number "
                           f"(above {seq})")
        return session.seq_result

    @staticmethod
    def _record(session: Session, op: str, seq: int | None, result=None) -> None:
        if seq is not None:
            session.seq, session.seq_op, session.seq_result = seq, op, result

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, _on_compute_thread(fn), *args)

    async def reset(self, session: Session, prompt, seed, protocol: str, async_execution=False,
                    seq=None, operating_point=None) -> None:
        prompt, seed, seq = check_prompt(prompt), check_count("seed", seed), check_count("seq", seq)
        async_execution = check_async_execution(async_execution)
        operating_point = check_operating_point(operating_point, self.preset)
        self.sessions.refuse_if_draining()  # a new episode: a stopping server starts none
        async with self._operation(session, "reset", protocol):
            if self._replay(session, "reset", seq) is not _NEW:
                return
            await self._discard_ahead(session)
            await self._compute(session.policy.reset, prompt, seed, operating_point, not async_execution)
            session.async_execution, session.failure, session.frame_offset = async_execution, None, 0
            session.pending = False
            session.started = True
            self._record(session, "reset", seq)

    def _require_started(self, session: Session) -> None:
        if not session.started:
            raise InputError(f"session {session.id!r} has no episode yet: send a reset with the prompt first")
        ahead = session.ahead
        error = ahead.exception() if ahead is not None and ahead.done() and not ahead.cancelled() else None
        if error is not None:
            self._fail(session, error)
            raise AheadFailed(f"{session.failure}; this episode cannot go on: send a reset")
        if session.failure is not None:
            raise Conflict(f"{session.failure}; this episode cannot go on: send a reset")

    def _fail(self, session: Session, error: BaseException) -> None:
        session.ahead = None
        session.failure = f"the chunk computed ahead failed: {type(error).__name__}: {error}"

    async def _discard_ahead(self, session: Session) -> None:
        """Drop the chunk computed ahead: cancelled if it has not started, else awaited (a worker thread
        cannot be interrupted, and the policy is about to change) and its outcome ignored."""
        ahead, session.ahead, session.ready, session.observation = session.ahead, None, None, None
        if ahead is not None and not ahead.cancel():
            await asyncio.wait([asyncio.wrap_future(ahead)])

    def _start_ahead(self, session: Session, protocol: str) -> None:
        loop = asyncio.get_running_loop()
        timer = metrics.OP_SECONDS.labels("act_ahead", protocol)
        observation, session.observation = session.observation, None
        session.ahead = (self.ahead_executor or self.executor).submit(
            _on_compute_thread(_act_ahead), session.policy, timer, session.async_execution == "grounded", observation)

        def done(_) -> None:  # in the worker thread; the sessions belong to the event loop
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._ahead_done, session)

        session.ahead.add_done_callback(done)

    def _ahead_done(self, session: Session) -> None:
        """The session may be idle now, or was closed meanwhile: then its policy goes back to the pool."""
        self.sessions.release(session)
        self.update_gauges()

    async def act(self, session: Session, images, protocol: str,
                  imagine: bool = False, seq=None) -> tuple[np.ndarray, np.ndarray | None]:
        """The next chunk's actions `[n_used, FC, N]` float32 in robot units and, when asked, the
        imagined video of the chunk (its predicted latents decoded, uint8 `[T, H, W, 3]`)."""
        seq = check_count("seq", seq)
        imagine = imagine is not None and check_flag("imagine", imagine)
        if images is not None:
            images = check_images(images, self.preset)
        async with self._operation(session, "act", protocol):
            chunk = self._replay(session, "act", seq)
            if chunk is not _NEW:
                imagined = await self._compute(session.policy.imagine, chunk.latents) if imagine else None
                return chunk.actions, imagined
            self._require_started(session)
            chunk = await self._next_chunk(session, images)
            self._record(session, "act", seq, chunk)
            try:
                imagined = await self._compute(session.policy.imagine, chunk.latents) if imagine else None
            finally:
                # The chunk ahead starts after the imagined video: on one compute thread the reply would
                # otherwise wait for the whole next chunk (0.73 s against 0.39 s for a first chunk, H200).
                if session.async_execution:
                    self._start_ahead(session, protocol)
        return chunk.actions, imagined

    async def _next_chunk(self, session: Session, images) -> PolicyChunk:
        policy = session.policy
        if session.pending:
            raise Conflict(f"the chunk at frame {session.frame_offset} was handed out and awaits its observation: "
                           f"send this chunk's observation (compute_kv_cache, op observe) before asking for another "
                           f"chunk; a client that retries sends a sequence number (seq) to get a lost reply again")
        chunk = session.ready
        if chunk is None:
            if images is None and policy.frame_offset == 0:
                raise InputError("the first chunk of an episode needs the camera images")
            chunk = await self._compute(policy.act, images)
        session.ready, session.frame_offset, session.pending = None, chunk.frame_offset, True
        return chunk

    async def observe(self, session: Session, keyframes, actions, protocol: str, seq=None) -> None:
        seq = check_count("seq", seq)
        actions = check_actions(actions, self.preset)
        async with self._operation(session, "observe", protocol):
            if self._replay(session, "observe", seq) is not _NEW:
                return
            self._require_started(session)
            await self._observe(session, keyframes, actions)
            self._record(session, "observe", seq)

    async def _observe(self, session: Session, keyframes, actions: np.ndarray) -> None:
        ahead = None
        policy = session.policy
        if not session.pending:
            if policy.observation_offset == 0 and policy.first_latent is None:
                raise InputError("observe before the first act of the episode: act first")
            raise Conflict("this chunk was observed already; ask for the next chunk (a client that retries sends "
                           "a sequence number, seq, to get a lost reply again)")
        if session.ahead is not None:
            if actions.shape[1] != self.preset.frame_chunk_size:
                raise InputError(f"actions: F = {actions.shape[1]}; asynchronous execution observes whole chunks "
                                 f"of {self.preset.frame_chunk_size} latent frames")
            waiting = time.perf_counter()
            try:
                ahead = await asyncio.wrap_future(session.ahead)
            except Exception as e:
                self._fail(session, e)
                raise AheadFailed(f"{session.failure}; this episode cannot go on: send a reset") from e
            metrics.AHEAD_WAIT_SECONDS.observe(time.perf_counter() - waiting)
        count = expected_keyframes(policy.observation_offset, actions.shape[1], self.preset)
        keyframes = check_keyframes(keyframes, count, self.preset)
        if ahead is not None and self.defer_observations:  # observed by the next chunk ahead: acknowledged now
            session.observation = (keyframes, actions)
            session.frame_offset = ahead.frame_offset
        else:
            await self._compute(policy.observe, keyframes, actions)
            session.frame_offset = policy.frame_offset
        session.pending = False
        if ahead is not None:
            session.ahead, session.ready = None, ahead


def _on_compute_thread(fn):
    """`fn`, reporting how long it waited for a compute thread and how many operations run at once."""
    queued = time.perf_counter()

    def run(*args):
        metrics.COMPUTE_WAIT_SECONDS.observe(time.perf_counter() - queued)
        metrics.COMPUTE_IN_FLIGHT.inc()
        try:
            return fn(*args)
        finally:
            metrics.COMPUTE_IN_FLIGHT.dec()

    return run


class ObservationFailed(RuntimeError):
    """The deferred observation of a chunk failed inside the policy (EpisodeService.defer_observations)."""


def _act_ahead(policy: Policy, timer, grounded: bool = False, observation: tuple | None = None) -> PolicyChunk:
    """The next chunk computed ahead, after the policy observes `observation` (keyframes, executed actions), the
    deferred observation of the chunk before it, if any."""
    with timer.time():
        if observation is not None:
            try:
                policy.observe_ahead(*observation)
            except Exception as e:
                raise ObservationFailed(f"observing the last chunk failed: {type(e).__name__}: {e}") from e
        return policy.act_ahead(grounded=True) if grounded else policy.act_ahead()
