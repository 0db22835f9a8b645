"""Where a served denoising pass spends its time, and what FP8 and other attention kernels change (one GPU).

Seven measurements, each beside its own baseline in the same process (robotwin preset, 5.09 B, random
weights, full KV cache of 9,792 entries); `--skip` leaves parts out, parts 6 and 7 run when asked for:

1. GEMMs: each block Linear's shape at the token counts of the passes (32 action queries, 64 for the
   action cache pass under CFG, 480 for a video pass under CFG): bf16 `F.linear` against FP8
   `_scaled_mm` with unit scales (models/fp8.py applies the token and channel scales to its result), the
   whole FP8Linear compiled, and `_scaled_mm` given the row-wise scales and bias (what models/fp8.py ran
   before). Timed as CUDA graphs of 20 calls.
2. Attention over the full cache (2b, `splitkv`: models/split_kv.py's Triton kernel beside the engine's) at the same query counts, per kernel PyTorch offers, and NVIDIA's
   cudnn-frontend SDPA op, bf16 and per-tensor FP8, when that package is installed (`.whl-attn`,
   bench/device_wheels.sh):
       source bench/device_env.sh $PWD/.whl-rgpu $PWD/.whl-attn && cd bench && \
           python pass_anatomy.py --skip gemm,passes,profile,timeline
2c. The FP8 FFN's middle (`ffn`): the up projection's epilogue, GELU and quantisation as inductor fuses them
   against models/fp8_gelu.py's kernel, alone and inside the compiled
   FP8FeedForward, at the same row counts; how many FP8 codes differ between them.
3. Whole passes of the served engine (compiled blocks, CUDA graphs, fused q/k/v), bf16 and FP8 weights:
   one video pass (CFG batch), one action step (conditional only), one action cache pass (CFG batch).
4. A profile of one chunk at the paper's operating point on the graphed engine, kernels grouped.
5. A timeline of chunks at the paper's operating point: per pass, the GPU time (CUDA events around it),
   the host time to issue it, and the GPU's idle time between passes (where the host, not the GPU, sets
   the pace); `--rope-copies` runs it again with the rotary table copied from the host at every call.
6. Batched passes (`--robots`): the passes of R robots as one batch whose KV caches are one tensor (one
   attention call over every robot's rows), against one robot's, to size what batched serving can gain.
7. An observation's encoding (`--observe`): one observe's keyframes (robotwin: 8 frames x 3 cameras)
   through the served ObservationEncoder, split into the host's preprocessing and the VAE's encode, in
   fp32 and bf16, in PyTorch's default and in the channels-last 3D layout, with the encoder compiled too;
   the latents' distance from fp32's.
   With `--robots`, also R robots' encodes as one batch (per robot).

    python bench/pass_anatomy.py --out bench/results/pass_anatomy_h200.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from chunk_latency import baseline, observation, run_chunks
from torch.nn.attention import SDPBackend, sdpa_kernel

from vaops.models.config import get_preset
from vaops.models.engine import EngineConfig, InferenceEngine
from vaops.models.fp8 import FP8Linear, quantize_blocks_fp8, quantize_rows
from vaops.models.transformer import build_transformer

TOKENS = {"action": 32, "action_cfg": 64, "video_cfg": 480}


def graph_time_us(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
    """Microseconds per call of `fn`, replayed as one CUDA graph of `calls` calls (no launch gaps)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def gemm_shapes(cfg) -> dict[str, tuple[int, int]]:
    d = cfg.inner_dim
    return {"qkv": (d, 3 * d), "attn out / cross q / cross out (x3)": (d, d), "ffn up": (d, cfg.ffn_dim),
            "ffn down": (cfg.ffn_dim, d)}


def gemms(cfg) -> list[dict]:
    torch._dynamo.config.recompile_limit = 64  # one compile per shape, as compile_blocks allows
    rows = []
    quantize = torch.compile(quantize_rows, dynamic=False)
    for name, (k, n) in gemm_shapes(cfg).items():
        linear = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
        fp8 = torch.compile(FP8Linear(linear), dynamic=False)  # as the compiled blocks run it
        wq, w_scale, bias, one = fp8.weight, fp8.weight_scale, fp8.bias.bfloat16(), fp8.one
        for m in TOKENS.values():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, x_scale = quantize(x)
            t = {
                "bf16": graph_time_us(lambda: linear(x)),
                "fp8 FP8Linear (quantise, GEMM, scale)": graph_time_us(lambda: fp8(x)),
                "fp8 GEMM, unit scales": graph_time_us(
                    lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)),
                "fp8 GEMM, row-wise scales and bias in it": graph_time_us(
                    lambda: torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, bias=bias,
                                             out_dtype=torch.bfloat16)),
                "quantise only": graph_time_us(lambda: quantize(x)),
            }
            flop = 2 * m * k * n
            rows.append({"gemm": name, "k": k, "n": n, "tokens": m, **{f"{v}_us": us for v, us in t.items()},
                         "bf16_tflops": flop / t["bf16"] / 1e6, "weight_read_us_at_4.2TB/s": k * n * 2 / 4.2e6})
            print(f"{name:38s} M={m:4d}  " + "  ".join(f"{v} {us:7.1f}" for v, us in t.items()), flush=True)
    return rows


def ffn_middle(cfg) -> list[dict]:
    """Part 2c (see the module's docstring)."""
    from diffusers.models.attention import FeedForward

    from vaops.models.fp8 import FP8FeedForward
    from vaops.models.fp8_gelu import gelu_quantize_rows, launch

    d, n = cfg.inner_dim, cfg.ffn_dim
    ffn = FeedForward(d, inner_dim=n, activation_fn="gelu-approximate").to("cuda", torch.bfloat16)
    ffn.net[0].proj, ffn.net[2] = FP8Linear(ffn.net[0].proj), FP8Linear(ffn.net[2])
    up = ffn.net[0].proj
    ffn = torch.compile(FP8FeedForward(ffn), dynamic=False)
    inductor = torch.compile(lambda p, s: quantize_rows(F.gelu(up.epilogue(p, s), approximate="tanh")), dynamic=False)
    rows = []
    for m in TOKENS.values():
        x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_rows(x)
        product = up.unit_product(xq)
        (rq, rs), (q, s) = inductor(product, xs), gelu_quantize_rows(product, xs, up.weight_scale, up.bias)
        ref = rq.float() * rs
        t = {"inductor": graph_time_us(lambda: inductor(product, xs)),
             "triton kernel": graph_time_us(lambda: gelu_quantize_rows(product, xs, up.weight_scale, up.bias))}
        for warps in (4, 8, 32):  # the kernel's launch (16 warps) against other widths
            t[f"triton kernel, {warps} warps"] = graph_time_us(
                lambda: launch(product, xs, up.weight_scale, up.bias, num_warps=warps))  # noqa: B023
        for name, off in (("FFN, inductor's middle", "inductor-gelu"), ("FFN, the kernel's middle", "")):
            with baseline(off):  # the compiled FFN recompiles on the change
                t[name] = graph_time_us(lambda: ffn(x))  # noqa: B023
        rows.append({"rows": m, "columns": n, **{f"{k}_us": v for k, v in t.items()},
                     "read_write_us_at_4.2TB/s": m * n * 3 / 4.2e6,
                     "codes_differing": (q.float() != rq.float()).float().mean().item(),
                     "scale_max_rel": ((s - rs).abs() / rs).max().item(),
                     "max_error_in_fp8_steps": ((q.float() * s - ref).abs() / (ref.abs() / 8 + rs * 2 ** -9)).max().item()})
        print(f"FFN middle M={m:4d}  " + "  ".join(f"{k} {v:7.1f}" for k, v in t.items())
              + f"  codes differing {rows[-1]['codes_differing']:.2e}", flush=True)
    return rows


def attentions(cfg, keys: int) -> list[dict]:
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    shapes = {"video pass (CFG batch 2 x 240)": (2, 240), "action step (1 x 32)": (1, 32),
              "action cache pass (2 x 32)": (2, 32)}
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for name, (b, lq) in shapes.items():
        q = torch.randn(b, heads, lq, dim, device="cuda", dtype=torch.bfloat16)
        # As the engine reads its cache: [B, L, H, D] seen as [B, H, L, D].
        k = torch.randn(b, keys, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(b, keys, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        row: dict = {"attention": name, "batch": b, "queries": lq, "keys": keys}
        for label, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    row[f"{label}_us"] = graph_time_us(lambda: F.scaled_dot_product_attention(q, k, v))
            except RuntimeError as e:
                row[f"{label}_us"] = None
                print(f"  {label}: {str(e).splitlines()[0][:120]}")
        frontend = cudnn_frontend_sdpa()
        if frontend is not None:  # the cuDNN frontend's own SDPA op (newer engines than torch's vendored one)
            scale = dim ** -0.5
            try:
                row["cudnn frontend sdpa_fwd_us"] = graph_time_us(lambda: frontend(q, k, v, scale, return_lse=False))
                ref32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                out = frontend(q, k, v, scale, return_lse=False)[0]
                row["cudnn frontend: max abs err vs fp32"] = (out.float() - ref32).abs().max().item()
            except Exception as e:  # noqa: BLE001 (a third-party op: record why it did not run)
                row["cudnn frontend sdpa_fwd_us"] = None
                print(f"  cudnn frontend: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            try:
                fp8_sdpa_row(row, q, k, v, scale)
            except Exception as e:  # noqa: BLE001 (a third-party op: record why it did not run)
                row["cudnn frontend sdpa_fp8_us"] = None
                print(f"  cudnn frontend sdpa_fp8: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        for splits in (2, 3, 4, 6):
            try:
                row[f"cudnn split-KV x{splits}, one call_us"] = graph_time_us(lambda: split_kv_one_call(q, k, v, splits))
            except RuntimeError as e:
                row[f"cudnn split-KV x{splits}, one call_us"] = None
                print(f"  split x{splits}: {str(e).splitlines()[0][:160]}")
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        try:
            row["cudnn split-KV x3, one call: max abs err vs fp32"] = (
                split_kv_one_call(q, k, v, 3).float() - ref).abs().max().item()
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                row["cudnn: max abs err vs fp32"] = (F.scaled_dot_product_attention(q, k, v).float() - ref).abs().max().item()
        except RuntimeError:
            pass
        kv_bytes = 2 * b * keys * heads * dim * 2
        row["kv_read_us_at_4.2TB/s"] = kv_bytes / 4.2e6
        row["flop_us_at_989TF"] = 4 * b * lq * keys * heads * dim / 989e6
        rows.append(row)
        print(name, {k_: (round(v_, 1) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    return rows


def split_kv_configs(b: int, lq: int) -> list[dict]:
    """The Triton split-KV launch settings tried per shape (models/split_kv.py)."""
    if lq >= 128:
        return [dict(block_m=bm, splits=s, block_n=bn, num_warps=w, num_stages=st)
                for bm in (64, 128) for s in (1, 2, 3, 4) for bn in (64, 128) for w in (4, 8) for st in (2, 3)
                if not (bm == 128 and bn == 128 and st == 3)]
    return [dict(splits=s, block_n=bn, num_warps=w, num_stages=st)
            for s in (6, 11, 16, 22, 32, 44) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)]


def split_kv_rows(cfg, keys: int, text_len: int, parts: str = "cache,text") -> list[dict]:
    """Part 2b: models/split_kv.py's Triton kernel against the kernel the engine calls now, per shape:
    over the cache, bf16 and with FP8 keys and values (one scale per key and head), unmasked and under the
    ring's live-slot mask (a 32-slot hole); over the prompt (the cross-attention's `text_len` keys), bf16."""
    from vaops.models.fp8 import quantize_kv
    from vaops.models.split_kv import split_kv_attention

    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    shapes = {}
    if "cache" in parts:
        shapes.update({"video pass (CFG batch 2 x 240)": (2, 240, keys), "action step (1 x 32)": (1, 32, keys),
                       "action cache pass (2 x 32)": (2, 32, keys)})
    elif "action" in parts:
        shapes["action step (1 x 32)"] = (1, 32, keys)
    if "text" in parts:
        shapes.update({"prompt, video pass (2 x 240)": (2, 240, text_len), "prompt, action step (1 x 32)": (1, 32, text_len)})
    rows = []
    for name, (b, lq, keys) in shapes.items():
        text = name.startswith("prompt")
        q = torch.randn(b, lq, heads, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, keys, heads, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, keys, heads, dim, device="cuda", dtype=torch.bfloat16)
        (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
        # the scales stored keys-contiguous ([B, H, N]) and passed as [B, N, H] views: one read a key tile
        ks_t, vs_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (ks, vs))
        valid = torch.ones(keys, dtype=torch.bool, device="cuda")
        valid[keys // 3: keys // 3 + 32] = False
        for masked in (False,) if text else (False, True):
            mask = valid if masked else None
            am = None if mask is None else mask.view(1, 1, 1, -1)  # as the engine passes it to attention
            ref = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                                 v.transpose(1, 2).float(), attn_mask=am).transpose(1, 2)
            engine_kernel = "cudnn" if (masked or lq >= 128) else "flash"
            row: dict = {"attention": name + (" under the live-slot mask" if masked else ""), "batch": b,
                         "queries": lq, "keys": keys, "engine kernel": engine_kernel}
            backend = SDPBackend.CUDNN_ATTENTION if engine_kernel == "cudnn" else SDPBackend.FLASH_ATTENTION
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            with sdpa_kernel([backend]):
                row["engine_us"] = graph_time_us(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=am))
                row["engine: max abs err vs fp32"] = (
                    F.scaled_dot_product_attention(qt, kt, vt, attn_mask=am).transpose(1, 2).float() - ref).abs().max().item()
            variants = {"triton bf16": (k, v, None, None), "triton fp8 kv": (k8, v8, ks, vs),
                        "triton fp8 kv, keys-contiguous scales": (k8, v8, ks_t, vs_t)}
            for label, kv in list(variants.items())[:1 if text else 3]:
                best = None
                for c in split_kv_configs(b, lq):
                    try:
                        us = graph_time_us(lambda: split_kv_attention(q, kv[0], kv[1], mask, kv[2], kv[3], **c),
                                           calls=10, replays=5)
                    except Exception as e:  # noqa: BLE001 (a launch setting the GPU cannot hold: skip it)
                        print(f"  {label} {c}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                        continue
                    if best is None or us < best[0]:
                        best = (us, c)
                if best is None:
                    continue
                c = best[1]
                row[f"{label}_us"] = graph_time_us(lambda: split_kv_attention(q, kv[0], kv[1], mask, kv[2], kv[3], **c))
                row[f"{label} config"] = c
                row[f"{label}: max abs err vs fp32"] = (
                    split_kv_attention(q, kv[0], kv[1], mask, kv[2], kv[3], **c).float() - ref).abs().max().item()
                if not masked:
                    row[f"{label} default config_us"] = graph_time_us(
                        lambda: split_kv_attention(q, kv[0], kv[1], None, kv[2], kv[3]))
            row["kv_read_us_at_4.2TB/s (bf16)"] = 2 * b * keys * heads * dim * 2 / 4.2e6
            rows.append(row)
            print(row["attention"], {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()
                                     if k_ != "attention"}, flush=True)
    return rows


def cudnn_frontend_sdpa():
    """`torch.ops.cudnn.sdpa_fwd` of NVIDIA's cudnn-frontend Python package when it is installed (PyPI
    `nvidia-cudnn-frontend`, 11.6 MB for cp312: carry it to the node), else None. Its router picks among
    cuDNN's engines and its own open kernels per shape; torch's SDPA uses the frontend vendored in torch."""
    try:
        import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd)
    except Exception as e:  # noqa: BLE001 (absent, or built for another CUDA)
        print(f"  cudnn frontend not available: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        return None
    return torch.ops.cudnn.sdpa_fwd


def fp8_sdpa_row(row: dict, q, k, v, scale: float) -> None:
    """The frontend's per-tensor FP8 SDPA (`sdpa_fp8`) on q, k, v [B, H, L, D] quantised with one scale each
    (absolute maximum -> 448): microseconds per call and the distance from fp32 attention. On Hopper its
    output is FP8 too (cuDNN 9.19 refuses bf16 there: Blackwell only), scaled as V is (O is a convex
    combination of V's rows), so the row records that output's error."""
    import cudnn

    e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    amax = {n: t.float().abs().amax().item() / 448.0 for n, t in (("q", q), ("k", k), ("v", v))}
    q8, k8, v8 = ((t.float() / amax[n]).to(torch.float8_e4m3fn) for n, t in (("q", q), ("k", k), ("v", v)))
    handle = cudnn.create_handle()
    graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
    tensors = {n: graph.tensor(name=n, dim=tuple(t.shape), stride=tuple(t.stride()), data_type=e4m3)
               for n, t in (("q", q8), ("k", k8), ("v", v8))}
    values = {"descale_q": amax["q"], "descale_k": amax["k"], "descale_v": amax["v"], "descale_s": 1 / 448.0,
              "scale_s": 448.0, "scale_o": 1 / amax["v"]}
    scalars = {n: graph.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32) for n in values}
    o, _, amax_s, amax_o = graph.sdpa_fp8(q=tensors["q"], k=tensors["k"], v=tensors["v"], **scalars, attn_scale=scale,
                                          generate_stats=False, use_causal_mask=False)
    out = torch.empty(q.shape, device=q.device, dtype=torch.float8_e4m3fn)
    o.set_output(True).set_dim(tuple(out.shape)).set_stride(tuple(out.stride())).set_data_type(e4m3)
    amaxes = [torch.zeros(1, 1, 1, 1, device=q.device) for _ in range(2)]
    for t in (amax_s, amax_o):
        t.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
    try:
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
    except Exception as e:  # noqa: BLE001 (a cuDNN build without the engine: record why)
        row["cudnn frontend sdpa_fp8_us"] = None
        print(f"  cudnn frontend sdpa_fp8: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return
    workspace = torch.empty(max(1, graph.get_workspace_size()), device=q.device, dtype=torch.uint8)
    pack = {tensors["q"]: q8, tensors["k"]: k8, tensors["v"]: v8, o: out, amax_s: amaxes[0], amax_o: amaxes[1],
            **{scalars[n]: torch.full((1, 1, 1, 1), x, device=q.device) for n, x in values.items()}}

    def call() -> None:
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        graph.execute(pack, workspace, handle=handle)

    call()
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    got = out.float() * amax["v"]
    row["cudnn frontend sdpa_fp8: rel L2 vs fp32"] = ((got - ref).norm() / ref.norm()).item()
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        bf16 = F.scaled_dot_product_attention(q, k, v).float()
    row["cudnn bf16: rel L2 vs fp32"] = ((bf16 - ref).norm() / ref.norm()).item()
    row["cudnn frontend sdpa_fp8_us"] = graph_time_us(call)


def split_kv_one_call(q, k, v, splits: int) -> torch.Tensor:
    """Attention over `splits` equal slices of the keys as one cuDNN call (the slices as batch rows: a
    view of a [B, L, H, D] cache), merged by their log-sum-exp: more thread blocks for the few query
    tiles of a video pass. q [B, H, Lq, D]; k/v [B, H, L, D] as views of [B, L, H, D]."""
    b, h, lq, d = q.shape
    ks, vs = (x.transpose(1, 2).unflatten(1, (splits, -1)).flatten(0, 1).transpose(1, 2) for x in (k, v))
    qs = q.unsqueeze(1).expand(b, splits, h, lq, d).flatten(0, 1)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True)[:2]
    w = torch.softmax(lse.reshape(b, splits, h, lq, 1).float(), dim=1)
    return (out.unflatten(0, (b, splits)).float() * w).sum(1).to(q.dtype)


@torch.no_grad()
def forward_ms(engine: InferenceEngine, kind: str, x: torch.Tensor, t: torch.Tensor, cond_only: bool,
               calls: int = 20) -> float:
    """GPU ms of one temporary pass (captured first, then `calls` replays back to back), under no_grad as
    the engine's act runs. Part 3 ran without it until 2026-12-01: its action step measured 10.2 ms, the
    same step 5.0 ms inside a chunk (bench/results/pass_timeline_h200.md), so the host set the pace."""
    for _ in range(3):  # capture, then steady replays
        engine._forward(kind, x, t, keep=False, predicted=False, cond_only=cond_only)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        engine._forward(kind, x, t, keep=False, predicted=False, cond_only=cond_only)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def engine_passes(preset, fp8: bool, text_len: int, seed: int) -> tuple[InferenceEngine, dict]:
    model = build_transformer(preset.transformer, seed=seed, device="cuda", dtype=torch.bfloat16)
    model.fuse_qkv_projections()
    if fp8:
        quantize_blocks_fp8(model)
    model.compile_blocks()
    engine = InferenceEngine(model, EngineConfig.from_preset(preset), backend="splitkv", cuda_graphs=True)
    prefill = preset.sampling.attn_window // 2 + 1
    run_chunks(engine, 1, prefill, text_len, seed)
    cache = engine.live_cache
    assert cache.full, "the prefill should fill the ring"
    c, m = engine.config, model.config
    video = torch.randn(1, m.in_channels, c.frame_chunk_size, c.latent_height, c.latent_width, device="cuda")
    actions = torch.randn(1, m.action_dim, c.frame_chunk_size, c.action_per_frame, 1, device="cuda")
    t = torch.full((1, c.frame_chunk_size), 500.0, device="cuda")
    out = {}
    for label, kind, x, cond_only in (("video pass, CFG batch", "video", video, False),
                                      ("action step, conditional only", "action", actions, True),
                                      ("action cache pass, CFG batch", "action", actions, False)):
        out[label] = forward_ms(engine, kind, x, t, cond_only)
        print(f"{'fp8' if fp8 else 'bf16'} {label}: {out[label]:.2f} ms", flush=True)
    return engine, out


# First match wins: inductor names its kernels after the ops they fuse ("triton_red_fused__scaled_mm_...").
KERNEL_GROUPS = [("attention", r"flash|fmha|sdpa|attention"),
                 ("fused elementwise (triton)", r"triton"),
                 ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|splitK"),
                 ("copy / index", r"copy|index|cat|gather|scatter"),
                 ("other", r".")]


def kernel_groups(prof, top: int = 30) -> dict:
    """A torch.profiler run's CUDA kernels, grouped (KERNEL_GROUPS) and the `top` slowest printed."""
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kernels: list[tuple[str, float, int]] = []
    for evt in prof.key_averages():
        us = float(getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0) or 0.0)
        if evt.device_type.name != "CUDA" or us <= 0:
            continue
        kernels.append((evt.key, us, evt.count))
        for group, pattern in KERNEL_GROUPS:
            if re.search(pattern, evt.key, re.IGNORECASE):
                groups[group][0] += us
                groups[group][1] += evt.count
                break
    kernels.sort(key=lambda r: -r[1])
    for name, us, n in kernels[:top]:
        print(f"{us / 1e3:8.2f} ms {n:6d}x  {name[:110]}")
    total = sum(us for _, us, _ in kernels)
    print(f"kernel time {total / 1e3:.1f} ms; " + ", ".join(f"{g} {v[0] / 1e3:.1f} ms ({v[1]} calls)"
                                                          for g, v in groups.items()))
    return {"kernel_ms": total / 1e3, "groups": {g: {"ms": v[0] / 1e3, "calls": v[1]} for g, v in groups.items()},
            "top_kernels": [{"name": n, "ms": us / 1e3, "calls": c} for n, us, c in kernels[:40]]}


def profile_paper_chunk(engine: InferenceEngine, preset, seed: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    engine.set_sampling(preset.operating_point("paper"))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for _ in range(2):  # capture the paper point's shapes first
        obs = observation(engine, gen)
        engine.act(generator=gen).actions.cpu()
        engine.observe(*obs)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        obs = observation(engine, gen)
        engine.act(generator=gen).actions.cpu()
        engine.observe(*obs)
        torch.cuda.synchronize()
    engine.set_sampling(preset.sampling)
    return kernel_groups(prof)


class _Forgetful(dict):
    """A RotaryEmbedding device cache that keeps nothing: every call copies the table from the host."""

    def __setitem__(self, key, value) -> None:
        pass


def chunk_timeline(engine: InferenceEngine, preset, seed: int, chunks: int = 4) -> dict:
    """Per pass of `chunks` paper-point chunks (after two unmeasured ones): GPU ms between CUDA events
    recorded around it, host ms to issue it, and GPU idle ms before it (since the previous pass ended,
    or since the chunk began)."""
    engine.set_sampling(preset.operating_point("paper"))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    forward = engine._forward
    records: list[dict] = []

    def timed(kind, x, t, keep, predicted, cond_only):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        host = time.perf_counter()
        start.record()
        out = forward(kind, x, t, keep, predicted, cond_only)
        end.record()
        records.append({"kind": kind, "rows": 1 if cond_only else engine.batch, "keep": keep,
                        "host_ms": (time.perf_counter() - host) * 1e3, "start": start, "end": end})
        return out

    def chunk() -> None:
        obs = observation(engine, gen)
        engine.act(generator=gen).actions.cpu()
        engine.observe(*obs)

    for _ in range(2):
        chunk()
    engine._forward = timed  # type: ignore[method-assign]
    out: dict = {"chunks": []}
    try:
        for _ in range(chunks):
            records.clear()
            torch.cuda.synchronize()
            begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            begin.record()
            chunk()
            finish.record()
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - wall) * 1e3
            prev = begin
            passes = []
            for r in records:
                passes.append({"kind": r["kind"], "rows": r["rows"], "keep": r["keep"],
                               "gpu_ms": r["start"].elapsed_time(r["end"]), "host_ms": r["host_ms"],
                               "idle_before_ms": prev.elapsed_time(r["start"])})
                prev = r["end"]
            gpu = sum(p["gpu_ms"] for p in passes)
            out["chunks"].append({"wall_ms": wall_ms, "gpu_span_ms": begin.elapsed_time(finish),
                                  "passes_gpu_ms": gpu, "idle_ms": sum(p["idle_before_ms"] for p in passes),
                                  "tail_ms": prev.elapsed_time(finish), "passes": passes})
            print(f"chunk: wall {wall_ms:.1f} ms, GPU span {begin.elapsed_time(finish):.1f}, passes {gpu:.1f}, "
                  f"idle between {out['chunks'][-1]['idle_ms']:.1f}, after the last {prev.elapsed_time(finish):.1f}",
                  flush=True)
            for p in passes:
                print(f"  {p['kind']:6s} x{p['rows']} keep={p['keep']!s:5s} gpu {p['gpu_ms']:6.2f} ms  "
                      f"host {p['host_ms']:6.2f} ms  idle before {p['idle_before_ms']:5.2f} ms", flush=True)
    finally:
        del engine._forward
        engine.set_sampling(preset.sampling)
    return out


def batched_passes(model, preset, robots: list[int], text_len: int, seed: int, profile: bool = False) -> list[dict]:
    """GPU ms of a video pass (CFG rows of R robots) and of an action step (one row per robot) on a full
    cache whose rows are the robots' (one tensor, so one attention call reads them all); `profile`: and
    one call's kernels, grouped."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m = model.config
    prompt = torch.randn(1, text_len, m.text_dim, generator=gen, device="cuda")
    rows_out = []
    for r in robots:
        row: dict = {"robots": r}
        for kind, rows in (("video", 2 * r), ("action", r)):
            engine = InferenceEngine(model, EngineConfig.from_preset(preset), backend="cudnn", cuda_graphs=False)
            engine.batch = rows
            engine.reset(prompt, prompt)
            with torch.no_grad():
                engine.text = model.text_context(prompt.expand(rows, -1, -1))
            for _ in range(preset.sampling.attn_window // 2 + 1):  # eager prefill to the full ring
                engine.observe(*observation(engine, gen))
            assert engine.live_cache.full
            engine.cuda_graphs = True
            c = engine.config
            x = (torch.randn(1, m.in_channels, c.frame_chunk_size, c.latent_height, c.latent_width, device="cuda")
                 if kind == "video" else
                 torch.randn(1, m.action_dim, c.frame_chunk_size, c.action_per_frame, 1, device="cuda"))
            t = torch.full((1, c.frame_chunk_size), 500.0, device="cuda")
            ms = forward_ms(engine, kind, x, t, cond_only=False)
            with torch.no_grad():
                if profile:
                    from torch.profiler import ProfilerActivity, profile as torch_profile

                    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                        engine._forward(kind, x, t, keep=False, predicted=False, cond_only=False)
                        torch.cuda.synchronize()
                    print(f"{r} robots, {kind} pass, one call's kernels:")
                    row[f"{kind}_profile"] = kernel_groups(prof, top=14)
            row[f"{kind}_ms"] = ms
            row[f"{kind}_ms_per_robot"] = ms / r
            print(f"{r} robots, {kind} pass ({rows} rows): {ms:.2f} ms, {ms / r:.2f} ms a robot", flush=True)
            del engine
            torch.cuda.empty_cache()
        rows_out.append(row)
    return rows_out


def observe_encoding(preset, seed: int, repeats: int = 10) -> list[dict]:
    """ms per observe's encode (median of `repeats`) per VAE setting, and its latents against fp32's (the
    first setting, served until stop 35); that fp32 encode's kernels, grouped. The last setting is the served
    one, made by models/vae.py `serve_on_gpu` itself."""
    import numpy as np

    from vaops.models.observation import ObservationEncoder, frames_to_video
    from vaops.models.vae import build_vae, serve_on_gpu

    def setting(dtype: torch.dtype, layout: torch.memory_format, compiled: bool = False):
        def prepare(vae):
            vae.to(dtype)
            for conv in (m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)):
                conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
            if compiled:  # inductor over the encoder's norms, activations and cache slices
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
                vae.encoder.compile(dynamic=False)
            return vae
        return prepare

    rng = np.random.default_rng(seed)
    first = {c.key: rng.integers(0, 255, (1, c.height, c.width, 3), dtype=np.uint8) for c in preset.cameras}
    frames = preset.frame_chunk_size * preset.frames_per_latent
    keyframes = {c.key: rng.integers(0, 255, (frames, c.height, c.width, 3), dtype=np.uint8) for c in preset.cameras}
    rows: list[dict] = []
    reference: torch.Tensor | None = None
    for label, prepare in (("fp32", setting(torch.float32, torch.contiguous_format)),
                           ("fp32, channels_last_3d", setting(torch.float32, torch.channels_last_3d)),
                           ("bf16", setting(torch.bfloat16, torch.contiguous_format)),
                           ("bf16, channels_last_3d", setting(torch.bfloat16, torch.channels_last_3d)),
                           ("fp32, encoder compiled", setting(torch.float32, torch.contiguous_format, compiled=True)),
                           ("bf16, channels_last_3d, encoder compiled (served: serve_on_gpu)", serve_on_gpu)):
        vae = prepare(build_vae(preset.vae, seed=seed).to("cuda"))
        encoder = ObservationEncoder(vae, preset)
        times, host, latents = [], [], None
        for i in range(repeats + 2):
            if i % 3 == 0:  # an episode's first observations run eagerly: time later ones, some after a reset
                encoder.reset()
                encoder.encode(first)
                encoder.encode(keyframes)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            latents = encoder.encode(keyframes)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            for c in preset.cameras:
                frames_to_video(keyframes[c.key], c.height, c.width)
            host.append((time.perf_counter() - t0) * 1e3)
        assert latents is not None
        latents = latents.float()
        if reference is None:
            reference = latents
        rel = float((latents - reference).norm() / reference.norm())
        row = {"setting": label, "encode_ms": sorted(times[2:])[repeats // 2], "host_preprocess_ms": sorted(host[2:])[repeats // 2],
               "latents_rel_l2_vs_fp32": rel}
        print(f"observe encode, {label}: {row['encode_ms']:.1f} ms (host preprocessing {row['host_preprocess_ms']:.1f} ms), "
              f"latents vs fp32 {rel:.2e}", flush=True)
        if not rows:  # where the fp32 encode's time goes
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                encoder.encode(keyframes)
                torch.cuda.synchronize()
            print("observe encode, fp32: one call's kernels")
            row["profile"] = kernel_groups(prof, top=12)
        rows.append(row)
        del vae, encoder
        torch.cuda.empty_cache()
    return rows


def batched_encoding(preset, seed: int, robots: list[int], repeats: int = 6) -> list[dict]:
    """ms per robot of an observe's VAE encode when R robots' observations are encoded as one batch (each
    camera group's stream with R times the batch rows), in fp32 (served until stop 35; the served encode is
    now models/vae.py `serve_on_gpu`'s): what batching the encodes of robots whose observations arrive
    together could save."""
    from vaops.models.observation import _camera_groups
    from vaops.models.vae import StreamingEncoder, build_vae

    vae = build_vae(preset.vae, seed=seed).to("cuda")
    frames = preset.frame_chunk_size * preset.frames_per_latent
    rows = []
    for r in robots:
        times = []
        streams = []
        for cams in _camera_groups(preset):
            c = cams[0]
            stream = StreamingEncoder(vae)
            stream.encode(torch.rand(r * len(cams), 3, 1, c.height, c.width, device="cuda") * 2 - 1)
            streams.append((stream, torch.rand(r * len(cams), 3, frames, c.height, c.width, device="cuda") * 2 - 1))
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for stream, clip in streams:
                stream.encode(clip)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        ms = sorted(times[1:])[repeats // 2]
        rows.append({"robots": r, "encode_ms": ms, "encode_ms_per_robot": ms / r})
        print(f"observe encode, {r} robots as one batch: {ms:.1f} ms, {ms / r:.1f} ms a robot", flush=True)
    del vae
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="robotwin")
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: gemm, ffn, attention, splitkv, passes, "
                                              "profile, timeline")
    p.add_argument("--precisions", default="bf16,fp8", help="the engines of parts 3-6")
    p.add_argument("--rope-copies", action="store_true",
                   help="part 5 again with the rotary table copied from host memory at every call (as before "
                        "2026-12-01), in the same process")
    p.add_argument("--splitkv-shapes", default="cache,text",
                   help="part 2b: reads over the cache (or only the action step's: action), the prompt, or both")
    p.add_argument("--observe", action="store_true", help="part 7: an observation's encoding")
    p.add_argument("--robots", default="", help="part 6: comma-separated robot counts, e.g. 1,2,4,8")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    preset = get_preset(args.preset)
    cfg = preset.transformer
    results: dict = {"preset": preset.name, "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    if "gemm" not in skip:
        results["gemms"] = gemms(cfg)
        save()
    if "ffn" not in skip:
        results["ffn_middle"] = ffn_middle(cfg)
        save()
    _, ph, pw = cfg.patch_size
    h, w = preset.latent_hw
    capacity = (preset.sampling.attn_window // 2) * preset.frame_chunk_size * (preset.action_per_frame + h * w // (ph * pw))
    if "attention" not in skip:
        results["attention"] = attentions(cfg, capacity)
        save()
    if "splitkv" not in skip:
        results["split_kv"] = split_kv_rows(cfg, capacity, args.text_len, args.splitkv_shapes)
        save()
    if args.observe:
        results["observe_encoding"] = observe_encoding(preset, args.seed)
        save()
        if args.robots:
            results["observe_encoding_batched"] = batched_encoding(preset, args.seed, [int(r) for r in args.robots.split(",")])
            save()
    if not {"passes", "profile", "timeline"} <= skip:
        passes = {}
        for fp8 in [p == "fp8" for p in args.precisions.split(",")]:
            engine, passes["fp8" if fp8 else "bf16"] = engine_passes(preset, fp8, args.text_len, args.seed)
            results["passes_ms"] = passes
            save()
            if "profile" not in skip:
                results[f"profile_paper_{'fp8' if fp8 else 'bf16'}"] = profile_paper_chunk(engine, preset, args.seed)
                save()
            if args.robots:
                results[f"batched_{'fp8' if fp8 else 'bf16'}"] = batched_passes(
                    engine.model, preset, [int(r) for r in args.robots.split(",")], args.text_len, args.seed,
                    profile="profile" not in skip)
                save()
            if "timeline" not in skip:
                results[f"timeline_paper_{'fp8' if fp8 else 'bf16'}"] = chunk_timeline(engine, preset, args.seed)
                save()
                if args.rope_copies:  # the same chunks with the rotary table copied from the host at each call
                    rope = engine.model.rope
                    kept, rope._on = rope._on, _Forgetful()
                    try:
                        results[f"timeline_paper_{'fp8' if fp8 else 'bf16'}_rope_copies"] = chunk_timeline(
                            engine, preset, args.seed)
                    finally:
                        rope._on = kept
                    save()
            del engine
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
