"""Episode sessions: one `Policy` each (its own KV cache, streaming VAE state and seed), all
built from one `PolicyWeights`, so the networks are loaded once and shared.

The number of sessions is bounded by `max_sessions`, by an optional budget for the caches and by the memory
the device has left: every session of one checkpoint has the same cache size, measured once on a probe policy
at start-up, and a session is only given a new policy while the device can hold one more beside a reserve (a
GPU's out-of-memory error mid-episode, or a CPU host's OOM killer, would otherwise be the limit).
Sessions idle longer than the timeout are closed; closed sessions' policies are kept in a pool
and reused, so their cache buffers are allocated once. Everything here runs on the server's
event loop; the policies' compute runs in worker threads under each session's lock, except the
chunk an asynchronous-execution session computes ahead, which runs while the robot executes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import psutil
import torch

from vaops.models.policy import Policy, PolicyChunk, PolicyWeights

log = logging.getLogger(__name__)
_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# A session that has answered its last chunk's observation and sent nothing for this long has ended its episode,
# as far as a stopping server waits for it (SessionManager.draining): within an episode the next act follows the
# observe's reply by a round trip.
DRAIN_QUIET_S = 2.0
# Closed sessions remembered, so a retried close is answered like the first one.
_CLOSED_REMEMBERED = 1024


class SessionError(Exception):
    """A request about sessions that cannot be honoured; the message says why."""


class UnknownSession(SessionError):
    pass


class SessionsFull(SessionError):
    """Every session is in use; `retry_after_s` is when the longest-idle one expires if nothing else changes."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Draining(SessionError):
    """The server is stopping: it lets the episodes in progress finish and starts no new one (a new server takes
    them: reconnect)."""


class Conflict(SessionError):
    """The request does not fit the session's state or its sequence numbers (a repeated act or observe)."""


@dataclass
class Session:
    id: str
    policy: Policy
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: bool = False  # reset() has run at least once
    retired: bool = False  # closed while an operation was running; pooled when it finishes
    # The chunk offset clients are told: the policy's own moves while a chunk is computed ahead.
    frame_offset: int = 0
    # Asynchronous execution (chosen at reset): `ahead` computes the chunk after the one the robot
    # executes; the observe of that one grounds it into `ready`, which the next act hands out.
    async_execution: bool | str = False  # True: naive; "grounded" (episode.ASYNC_MODES)
    ahead: Future | None = None
    ready: PolicyChunk | None = None
    # The observation of the chunk the robot has just finished, checked and acknowledged; the policy observes
    # it first thing in the next chunk computed ahead (EpisodeService.defer_observations): (keyframes, actions).
    observation: tuple | None = None
    failure: str | None = None  # why the episode cannot go on until a reset
    # A chunk was handed out and awaits its observation: a second act (or observe) then is refused.
    pending: bool = False
    # The last request that carried a sequence number: its number, op and result, replayed on a retry.
    seq: int | None = None
    seq_op: str | None = None
    seq_result: object = None

    @property
    def busy(self) -> bool:
        return self.lock.locked() or (self.ahead is not None and not self.ahead.done())

    def mid_episode(self, now: float) -> bool:
        """Whether an episode is under way: an operation running, a chunk out awaiting its observation or computed
        ahead, or a request within the last DRAIN_QUIET_S (a robot's next act follows its observe at once)."""
        return (self.busy or self.pending or self.ahead is not None or self.ready is not None
                or now - self.last_used < DRAIN_QUIET_S)


def cache_bytes(policy: Policy) -> int:
    cache = policy.engine.cache
    return 0 if cache is None else cache.nbytes()


# What a pooled policy holds beyond its KV cache, as a fraction of the cache: its CUDA graphs' private pool and its
# streaming VAE state. One H200, robotwin, FP8: allocated memory grew 8.15 GB a policy against a 7.22 GB cache
# (+13%, 75.3 -> 91.6 GB for the pool's 9th and 10th, bench/results/serve_load_batched_default_h200.md); 25%
# leaves a margin for presets whose graphs weigh more against their cache.
POLICY_OVERHEAD = 0.25
# Memory kept free beside the sessions by default, as a fraction of the device's: activations of the passes not
# captured in graphs, the batches', other processes (7 GB of an H200's 141).
RESERVE_FRACTION = 0.05


def device_memory(device: torch.device) -> tuple[int, int]:
    """(bytes a new session could still take, bytes in all) on the device: on a GPU its free memory plus what
    torch's caching allocator holds unused; on a CPU the memory available to processes."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total
    vm = psutil.virtual_memory()
    return vm.available, vm.total


def sessions_that_fit(free_bytes: int, per_session_bytes: int, reserve_bytes: int) -> int:
    """How many more sessions of `per_session_bytes` fit in `free_bytes` beside `reserve_bytes`."""
    return max(0, (free_bytes - reserve_bytes) // max(per_session_bytes, 1))


def pooled_policy(weights: PolicyWeights, warm_up: bool) -> Policy:
    """A policy as the server pools it before any client asks: reset once, which allocates its cache (so
    its size is known), and with `warm_up` (on a GPU) every shape of an episode run once, its graphs captured."""
    policy = weights.new_policy()
    policy.reset("", seed=0)
    if warm_up:
        policy.warm_up()
    return policy


class SessionManager:
    def __init__(self, weights: PolicyWeights, max_sessions: int, max_cache_bytes: int | None,
                 idle_timeout_s: float, clock: Callable[[], float] = time.monotonic, warm_up: bool = False,
                 warm_sessions: int = 1, memory_reserve_bytes: int | None = None):
        """`memory_reserve_bytes`: kept free beside the sessions (None: RESERVE_FRACTION of the device's memory)."""
        self.weights = weights
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        probe = pooled_policy(weights, warm_up)  # the first session gets this policy
        self.bytes_per_session = cache_bytes(probe)
        self.capacity = max_sessions
        if max_cache_bytes is not None:
            fit = max_cache_bytes // max(self.bytes_per_session, 1)
            if fit < 1:
                raise ValueError(f"the cache budget of {max_cache_bytes} bytes is smaller than one session's "
                                 f"KV cache ({self.bytes_per_session} bytes)")
            self.capacity = min(max_sessions, fit)
        self.device = torch.device(weights.device)
        self.memory_per_session = int(self.bytes_per_session * (1 + POLICY_OVERHEAD))
        free, total = device_memory(self.device)
        self.memory_reserve_bytes = int(RESERVE_FRACTION * total) if memory_reserve_bytes is None else memory_reserve_bytes
        fit = 1 + sessions_that_fit(free, self.memory_per_session, self.memory_reserve_bytes)  # 1: the probe's
        if fit < self.capacity:
            log.warning("%s memory holds %d session(s), not %d: %.1f GiB free beside a %.1f GiB reserve, %.2f GiB "
                        "a session (its KV cache and %d%% more)", self.device.type.upper(), fit, self.capacity,
                        free / 2**30, self.memory_reserve_bytes / 2**30, self.memory_per_session / 2**30,
                        round(100 * POLICY_OVERHEAD))
            self.capacity = fit
        self._pool: list[Policy] = [probe]
        if warm_up:  # more policies, each with its own cache and graphs; popped first (the pool's end)
            for _ in range(min(warm_sessions, self.capacity) - 1):
                self._pool.append(pooled_policy(weights, warm_up))
        # Where policies are warmed up (a GPU), the policies made after start-up are not: `open` says so.
        self.warmed = len(self._pool) if warm_up else 0
        self._sessions: dict[str, Session] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        # Stopping (a signal, PolicyServer): no new session or episode, the ones under way finish.
        self.draining = False

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def total_cache_bytes(self) -> int:
        return sum(cache_bytes(s.policy) for s in self._sessions.values())

    def open(self, session_id: str | None = None) -> Session:
        """A new session (with the given id, or a fresh one)."""
        if session_id is None:
            session_id = uuid.uuid4().hex
        elif not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
            raise SessionError(f"session id {session_id!r} must be 1-128 characters of letters, digits, '_.:-'")
        if session_id in self._sessions:
            raise SessionError(f"session {session_id!r} already exists")
        self.refuse_if_draining()
        self.expire_idle()
        if len(self._sessions) >= self.capacity:
            wait = self.retry_after_s()
            raise SessionsFull(
                f"all {self.capacity} sessions are in use (one KV cache is {self.bytes_per_session / 2**20:.1f} MiB); "
                f"sessions idle for {self.idle_timeout_s:g} s are closed: retry in {wait} s, or close a session",
                wait)
        if not self._pool:
            self._check_memory()
        self._closed.pop(session_id, None)
        policy = self._pool.pop() if self._pool else self._new_policy(session_id)
        session = Session(session_id, policy, self.clock())
        self._sessions[session_id] = session
        return session

    def _new_policy(self, session_id: str) -> Policy:
        """A policy made for a session, every pooled one being in use. One that is not warmed up captures its CUDA
        graphs during its first episodes, and later at each cache level where it first runs its action steps alone
        (one H200: 0.53 s for one such graph, bench/results/serve_load_capture_source_h200.md), so the operator is
        told how to avoid it."""
        if self.warmed:
            log.warning("session %s gets a policy that was not warmed up (the %d warmed at start are in use): it "
                        "captures its CUDA graphs during its first episodes, each capture holding its robot up for "
                        "0.2-0.6 s; `vaops serve --warm-sessions N` warms N before ready", session_id, self.warmed)
        return self.weights.new_policy()

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise Draining("this server is stopping: it finishes the episodes under way and starts no new one; "
                           "reconnect (a new server takes new episodes)")

    def episodes_under_way(self) -> int:
        now = self.clock()
        return sum(s.mid_episode(now) for s in self._sessions.values())

    def _check_memory(self) -> None:
        """Before a new policy is made: refuse (SessionsFull) while the device cannot hold one more session beside
        the reserve. Checked at each such open, not only at start-up: other processes may take or give back
        memory meanwhile."""
        free, _ = device_memory(self.device)
        if sessions_that_fit(free, self.memory_per_session, self.memory_reserve_bytes) >= 1:
            return
        wait = self.retry_after_s()
        raise SessionsFull(
            f"no {self.device.type.upper()} memory for another session: {free / 2**30:.1f} GiB free, a session needs "
            f"{self.memory_per_session / 2**30:.2f} GiB beside a {self.memory_reserve_bytes / 2**30:.1f} GiB reserve "
            f"(vaops serve --memory-reserve-gb), and all {len(self._sessions)} open session(s) hold theirs: retry in "
            f"{wait} s, or close a session", wait)

    def get(self, session_id) -> Session:
        if not isinstance(session_id, str):
            raise UnknownSession(f"session id must be a string, got {type(session_id).__name__}")
        try:
            session = self._sessions[session_id]
        except KeyError:
            raise UnknownSession(f"unknown session {session_id!r}: never opened, closed, or expired after "
                                 f"{self.idle_timeout_s:g} s idle; start one with a reset") from None
        session.last_used = self.clock()
        return session

    def retry_after_s(self) -> int:
        """Whole seconds until the longest-idle session expires if none is used meanwhile (at least 1);
        a busy session counts as used now."""
        now = self.clock()
        left = [self.idle_timeout_s - (0.0 if s.busy else now - s.last_used) for s in self._sessions.values()]
        return max(1, math.ceil(min(left, default=0.0)))

    def closed_recently(self, session_id) -> bool:
        """Closed (or expired) among the last 1024 sessions: a retried close answers as the first did."""
        return isinstance(session_id, str) and session_id in self._closed

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self._closed[session_id] = None
        while len(self._closed) > _CLOSED_REMEMBERED:
            self._closed.popitem(last=False)
        if session.ahead is not None:
            session.ahead.cancel()  # a chunk ahead not started yet never runs; a running one finishes
        if session.busy:
            session.retired = True  # its policy is still computing: `release` pools it afterwards
        else:
            self._pool.append(session.policy)

    def release(self, session: Session) -> None:
        """Called after each operation and chunk computed ahead: pool the policy of a session closed meanwhile."""
        if session.retired and not session.busy:
            session.retired = False
            self._pool.append(session.policy)

    def expire_idle(self) -> list[str]:
        now = self.clock()
        stale = [s.id for s in self._sessions.values()
                 if not s.busy and now - s.last_used > self.idle_timeout_s]
        for sid in stale:
            self.close(sid)
        return stale
