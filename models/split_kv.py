"""Split-KV attention over a long KV cache (Triton; GPU inference).

The served passes attend a few new queries (32 action tokens; 2 x 240 video tokens under CFG) to a
cache of up to 9,792 keys. The key axis is split across thread blocks, each block computes its slice's
softmax-weighted values and log-sum-exp, and a second kernel merges the slices:
- an action step (1 x 32 queries) is bound by reading the cache (120 MB a layer at the robotwin
  preset), which takes the whole GPU only when the keys are spread over every SM;
- the keys may carry a validity vector (the ring's live-slot mask: one flag a key, not a dense mask),
  which the mask-free flash kernel cannot take and cuDNN's masked path reads 32 queries at 5x the
  unmasked cost (H200: 212 against 41 us a layer; this kernel 43 us);
- the keys and values may be FP8 (e4m3) with one float32 scale per key and head (models/fp8.py
  `quantize_kv`), which halves the bytes read but measured slower on an H200, with the scales
  heads-contiguous or keys-contiguous alike (42.7 and 42.9 against 37.5 us for an action step): the
  conversion costs more than the read saves. A KV cache keeping an FP8 copy for the action passes made
  whole chunks slower (bench/results/chunk_latency_fp8_kv_h200.json), so the served cache stays bf16.

Layout as the cache stores it: q [B, M, H, D], k/v [B, N, H, D]; output [B, M, H, D] in q's dtype.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .fp8 import FP8

# A row table's fields (`split_kv_rows`, `store_rows`), one int64 each: the row's key offset and value offset
# (elements from the anchor tensors), its flags' offset (from the flags anchor), its number of keys, and the ring
# slot its new entries start at.
ROW_FIELDS = tl.constexpr(5)
KEY, VALUE, FLAGS, KEYS, SLOT = (tl.constexpr(i) for i in range(5))
ALIGN = tl.constexpr(16)  # the offsets are whole multiples of it (elements)


@triton.jit
def _partial(Q, K, V, KS, VS, VALID, ROWS, Out, Lse,
             sqb, sqm, sqh, skb, skn, skh, svb, svn, svh, ssb, ssh, ssn,
             sob, soh, sos, som, slb, slh, sls,
             M, N, H, keys_per_split, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
             SCALED: tl.constexpr, MASKED: tl.constexpr, TABLED: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=offs_m[:, None] < M, other=0.0)
    if TABLED:  # row b's keys, values and flags lie anywhere: its ROWS entry's KEY, VALUE, FLAGS and KEYS fields
        # Offsets of whole 16-element blocks (split_kv_rows checks): without the hint the loads cannot be vectorised
        # (an action pass's read took twice as long, bench/results/rows_kernel_h200.json).
        K = K + tl.multiple_of(tl.load(ROWS + b * ROW_FIELDS + KEY), ALIGN)
        V = V + tl.multiple_of(tl.load(ROWS + b * ROW_FIELDS + VALUE), ALIGN)
        VALID = VALID + tl.multiple_of(tl.load(ROWS + b * ROW_FIELDS + FLAGS), ALIGN)
        N = tl.minimum(N, tl.load(ROWS + b * ROW_FIELDS + KEYS).to(tl.int32))
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = offs_n < end
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=keep[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=keep[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
        if SCALED:
            s = s * tl.load(KS + b * ssb + h * ssh + offs_n * ssn, mask=keep, other=0.0)[None, :]
        if MASKED:
            keep = keep & (tl.load(VALID + offs_n, mask=keep, other=0) != 0)
        s = tl.where(keep[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no live key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if SCALED:
            p = p * tl.load(VS + b * ssb + h * ssh + offs_n * ssn, mask=keep, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    live = l_i > 0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("-inf"))
    row = offs_m < M
    tl.store(Out + b * sob + h * soh + split * sos + offs_m[:, None] * som + offs_d[None, :], out, mask=row[:, None])
    tl.store(Lse + b * slb + h * slh + split * sls + offs_m, lse, mask=row)


@triton.jit
def _merge(Part, Lse, OUT, S, sob, soh, sos, som, slb, slh, sls, sub, sum_, suh, M, H,
           D: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    lse = tl.load(Lse + b * slb + h * slh + offs_s * sls + m, mask=offs_s < S, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(Part + b * sob + h * soh + offs_s[:, None] * sos + m * som + offs_d[None, :],
                mask=offs_s[:, None] < S, other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * sub + m * sum_ + h * suh + offs_d, out.to(OUT.dtype.element_ty))


def default_splits(blocks: int, keys: int, sms: int, block_n: int) -> int:
    """Key slices so that a batch row's thread blocks cover the GPU about twice, each slice at least 4 key
    blocks long (shorter ones spend more on the merge than they save). H200, 24 heads x 32 queries over
    9,792 keys: 11 slices was the fastest of 6-44 for one and for two batch rows
    (bench/results/pass_anatomy_splitkv_h200.json)."""
    return max(1, min(math.ceil(2 * sms / blocks), keys // (4 * block_n)))


def fitting_stages(shared_memory: int, block_m: int, block_n: int, d: int, q_bytes: int, kv_bytes: int,
                   wanted: int = 3) -> int:
    """Software-pipelining stages (buffered key and value tiles) that fit `shared_memory` bytes a block,
    with the query tile, the probabilities' tile and 16 KB for Triton's own layout conversions. H200
    (227 KB a block): the 3 measured fastest; an RTX 3090 or 4090 (99 KB): 2."""
    for stages in range(wanted, 1, -1):
        need = stages * block_n * d * 2 * kv_bytes + block_m * d * q_bytes + block_m * block_n * 2 + 16 * 1024
        if need <= shared_memory:
            return stages
    return 1


def _shared_memory(props) -> int:
    """Bytes of shared memory a thread block may use: the SM's, less the 1 KB CUDA reserves a block."""
    sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    return sm - 1024 if sm else 99 * 1024


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
                       k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                       splits: int | None = None, block_m: int | None = None, block_n: int = 64,
                       num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the keys with `valid` set (all keys when None).

    q [B, M, H, D]; k/v [B, N, H, D] (bf16/fp16/fp32, or FP8 with `k_scale`/`v_scale` [B, N, H] float32,
    any strides, the same for both: keys-contiguous reads fastest); valid: [N] bool. The last dimension of
    q, k and v must be contiguous.
    """
    b, m, h, _ = q.shape
    n = k.shape[1]
    scaled = k_scale is not None
    if scaled != (v_scale is not None) or scaled != (k.dtype == FP8):
        raise ValueError("FP8 keys and values need both scales (and scales need FP8 keys and values)")
    scales = None
    if k_scale is not None and v_scale is not None:
        ks, vs = k_scale, v_scale
        if tuple(ks.shape) != (b, n, h) or ks.shape != vs.shape or ks.stride() != vs.stride():
            raise ValueError(f"k_scale and v_scale need shape {(b, n, h)} and one layout, got {tuple(ks.shape)} "
                             f"and {tuple(vs.shape)}")
        scales = (ks, vs, (ks.stride(0), ks.stride(2), ks.stride(1)))
    return _attend(q, k, v, (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2)), n,
                   None if valid is None else valid.view(torch.uint8), None, scales, splits, block_m, block_n,
                   num_warps, num_stages)


def split_kv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flags: torch.Tensor, rows: torch.Tensor,
                  keys: int, key_strides: tuple[int, int], value_strides: tuple[int, int],
                  splits: int | None = None, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """Split-KV attention where each row b of q [B, M, H, D] reads keys and values of its own, wherever they lie
    (each robot's KV cache or prompt, models/batch.py): from `k`, `v` and `flags` (anchors: any tensors of the keys'
    dtype and of uint8) plus row b's offsets in `rows` [B, ROW_FIELDS] int64 (its KEY, VALUE and FLAGS fields, in
    elements, whole multiples of ALIGN: the table's maker checks), over its first min(`keys`, KEYS field) keys, those
    with a nonzero flag. The rows' keys share the strides (keys, heads) `key_strides`, their values
    `value_strides`. One launch for all rows whatever their
    sources, so a CUDA graph captured once serves any set of robots: the table is its input."""
    if rows.dtype != torch.int64 or tuple(rows.shape) != (q.shape[0], ROW_FIELDS.value):
        raise ValueError(f"rows must be int64 [{q.shape[0]}, {ROW_FIELDS.value}], got {rows.dtype} {tuple(rows.shape)}")
    if k.data_ptr() % (ALIGN.value * k.element_size()) or v.data_ptr() % (ALIGN.value * v.element_size()):
        raise ValueError(f"the anchors must lie at whole multiples of {ALIGN.value} elements")
    return _attend(q, k, v, (0, *key_strides), (0, *value_strides), keys, flags, rows, None, splits, None, block_n,
                   num_warps, None)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_strides: tuple[int, int, int],
            v_strides: tuple[int, int, int], n: int, flags: torch.Tensor | None, rows: torch.Tensor | None,
            scales: tuple | None, splits: int | None, block_m: int | None, block_n: int, num_warps: int,
            num_stages: int | None) -> torch.Tensor:
    """The two kernels over n keys: q's rows read k/v at strides (row, key, head), or through `rows` (a table)."""
    b, m, h, d = q.shape
    if d & (d - 1) or d < 16:
        raise ValueError(f"split-KV attention needs a power-of-two head dim >= 16, got {d}")
    block_m = block_m or max(16, min(64, triton.next_power_of_2(m)))
    m_blocks = triton.cdiv(m, block_m)
    props = torch.cuda.get_device_properties(q.device) if q.is_cuda else None  # None: Triton's interpreter
    if splits is None:
        splits = default_splits(m_blocks * h, n, props.multi_processor_count if props else 132, block_n)
    if num_stages is None:
        num_stages = fitting_stages(_shared_memory(props) if props else 227 * 1024, block_m, block_n, d,
                                    q.element_size(), k.element_size())
    keys_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, keys_per_split)
    o = torch.empty(b, h, splits, m, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, h, splits, m, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    ks, vs, ss = scales if scales is not None else (lse, lse, (0, 0, 0))
    args = (q, k, v, ks, vs, lse if flags is None else flags, lse if rows is None else rows, o, lse,
            q.stride(0), q.stride(1), q.stride(2), *k_strides, *v_strides, *ss,
            o.stride(0), o.stride(1), o.stride(2), o.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
            m, n, h, keys_per_split, d ** -0.5 * math.log2(math.e))
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, D=d, SCALED=scales is not None, MASKED=flags is not None,
                TABLED=rows is not None, num_warps=num_warps)
    try:
        _partial[(m_blocks, b * h, splits)](*args, **meta, num_stages=num_stages)
    except triton.runtime.errors.OutOfResources:  # a GPU with less shared memory than estimated: no pipelining
        _partial[(m_blocks, b * h, splits)](*args, **meta, num_stages=1)
    _merge[(b * h, m)](
        o, lse, out, splits, o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2), out.stride(0), out.stride(1), out.stride(2), m, h,
        D=d, BLOCK_S=max(2, triton.next_power_of_2(splits)))
    return out


@triton.jit
def _store(New, Dst, ROWS, snb, snm, snh, sdn, sdh, M, capacity, FIELD: tl.constexpr, BLOCK_M: tl.constexpr,
           D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    keep = offs_m[:, None] < M
    slots = (tl.load(ROWS + b * ROW_FIELDS + SLOT) + offs_m) % capacity
    dst = Dst + tl.multiple_of(tl.load(ROWS + b * ROW_FIELDS + FIELD), ALIGN) + h * sdh
    x = tl.load(New + b * snb + h * snh + offs_m[:, None] * snm + offs_d[None, :], mask=keep)
    tl.store(dst + slots[:, None] * sdn + offs_d[None, :], x.to(Dst.dtype.element_ty), mask=keep)


def store_rows(k: torch.Tensor, v: torch.Tensor, k_anchor: torch.Tensor, v_anchor: torch.Tensor,
               rows: torch.Tensor, capacity: int, key_strides: tuple[int, int], value_strides: tuple[int, int]) -> None:
    """Store row b's new keys and values (k, v [B, M, H, D]) into its own ring of `capacity` slots, at slots
    SLOT, SLOT + 1, ... (mod capacity) from the row's KEY and VALUE offsets (`split_kv_rows`' table), in one launch
    each for all rows."""
    b, m, h, d = k.shape
    for new, anchor, field, strides in ((k, k_anchor, KEY, key_strides), (v, v_anchor, VALUE, value_strides)):
        _store[(b, h)](new, anchor, rows, new.stride(0), new.stride(1), new.stride(2), *strides, m, capacity,
                       FIELD=field.value, BLOCK_M=triton.next_power_of_2(m), D=d)
