"""The Triton split-KV attention kernel (models/split_kv.py), run by Triton's interpreter on the CPU: the same
kernel source the GPU compiles, checked against PyTorch's attention. The interpreter is chosen when Triton is
imported, so the kernel runs in a child process started with TRITON_INTERPRET=1."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CHECKS = r"""
import json
import torch
import torch.nn.functional as F
from vaops.models.fp8 import quantize_kv
from vaops.models.split_kv import split_kv_attention


def reference(q, k, v, valid=None):
    mask = None if valid is None else valid.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                         v.transpose(1, 2).float(), attn_mask=mask)
    return out.transpose(1, 2)


def qkv(b=2, m=20, h=3, d=32, n=300, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, x, h, d, generator=g).to(dtype) for x in (m, n, n)]


def err(a, b):
    return (a.float() - b.float()).abs().max().item()


r = {}
q, k, v = qkv()
for splits in (1, 3, 5):
    out = split_kv_attention(q, k, v, splits=splits, block_n=32)
    r[f"splits {splits}"] = err(out, reference(q, k, v))
    r["shape and dtype kept"] = out.shape == q.shape and out.dtype == q.dtype
q, k, v = qkv(b=1, m=32, n=256)
valid = torch.ones(256, dtype=torch.bool)
valid[64:128] = False  # one of the four slices holds no live key at all
valid[200:203] = False
out = split_kv_attention(q, k, v, valid, splits=4, block_n=32)
r["masked"] = err(out, reference(q, k, v, valid))
r["masked vs unmasked"] = err(out, reference(q, k, v))
q, k, v = qkv(dtype=torch.float16)
(k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
r["fp8 layout"] = k8.dtype == torch.float8_e4m3fn and tuple(ks.shape) == tuple(k.shape[:3])
r["fp8"] = err(split_kv_attention(q, k8, v8, k_scale=ks, v_scale=vs, splits=3, block_n=32), reference(q, k, v))
# The KV cache's layout: scales stored keys-contiguous ([B, H, N]) and passed as a [B, N, H] view.
ks_t, vs_t = ks.transpose(1, 2).contiguous().transpose(1, 2), vs.transpose(1, 2).contiguous().transpose(1, 2)
r["fp8 keys-contiguous scales"] = err(split_kv_attention(q, k8, v8, k_scale=ks_t, v_scale=vs_t, splits=3, block_n=32),
                                      split_kv_attention(q, k8, v8, k_scale=ks, v_scale=vs, splits=3, block_n=32))
# The engine's masked read: a KV cache evicted and not full, read whole under its live-slot flags (the view
# of one layer of the 5-D ring, [1, 1, 1, N] reshaped), against the live entries alone.
from vaops.models.kv_cache import KVCache

cache = KVCache(num_layers=2, batch=2, capacity=96, heads=3, head_dim=32, dtype=torch.float32, device="cpu")
g = torch.Generator().manual_seed(2)
for length, keep, predicted in ((70, True, False), (40, True, True), (0, None, None), (20, True, False)):
    if keep is None:
        cache.drop_predicted()
        continue
    w = cache.begin(length, keep=keep, predicted=predicted)
    for layer in range(2):
        cache.store(layer, w, torch.randn(2, length, 3, 32, generator=g), torch.randn(2, length, 3, 32, generator=g))
    cache.end(w)
w = cache.begin(8, keep=False)  # 84 of 96 slots live, the 14 oldest evicted
new_k, new_v = torch.randn(1, 8, 3, 32, generator=g), torch.randn(1, 8, 3, 32, generator=g)
cache.store(1, w, new_k, new_v, batch=slice(0, 1))
keys, values, mask = cache.read(1, batch=slice(0, 1), static=True)
r["cache masked"] = mask is not None and 0 < cache.head and not cache.full
q = torch.randn(1, 8, 3, 32, generator=g)
live_k, live_v = cache.live(1, slice(0, 1))
r["cache read"] = err(split_kv_attention(q, keys, values, mask.reshape(-1), block_n=32), reference(q, live_k, live_v))
for name, call in {"fp8 without scales": lambda: split_kv_attention(q, k8, v8),
                   "odd head dim": lambda: split_kv_attention(*qkv(d=24))}.items():
    try:
        call()
        r[name] = "accepted"
    except ValueError as e:
        r[name] = str(e)
print(json.dumps(r))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECKS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_split_kv_matches_attention_for_any_number_of_key_slices(interpreted):
    assert interpreted["shape and dtype kept"]
    for splits in (1, 3, 5):
        assert interpreted[f"splits {splits}"] < 2e-6


def test_split_kv_reads_only_the_keys_flagged_valid_even_a_whole_empty_slice(interpreted):
    assert interpreted["masked"] < 2e-6
    assert interpreted["masked vs unmasked"] > 1e-2  # the mask changes the answer


def test_split_kv_reads_the_kv_cache_under_its_live_slot_flags_as_the_live_entries(interpreted):
    assert interpreted["cache masked"]  # evicted and not full: the state the masked read serves
    assert interpreted["cache read"] < 2e-6


def test_split_kv_with_fp8_keys_and_values_stays_close(interpreted):
    assert interpreted["fp8 layout"]
    assert 1e-4 < interpreted["fp8"] < 0.05  # e4m3 keeps 3 mantissa bits: close, not exact
    assert interpreted["fp8 keys-contiguous scales"] == 0  # the cache's scale layout reads the same


def test_split_kv_refuses_fp8_without_scales_and_odd_head_dims(interpreted):
    assert "scales" in interpreted["fp8 without scales"]
    assert "power-of-two head dim" in interpreted["odd head dim"]


def test_default_slices_cover_the_gpu_about_twice_and_stay_long_enough():
    from vaops.models.split_kv import default_splits

    assert default_splits(blocks=24, keys=9792, sms=132, block_n=64) == 11  # an action step on an H200
    assert default_splits(blocks=24, keys=300, sms=132, block_n=64) == 1  # too few keys to split


def test_only_key_validity_masks_go_to_split_kv():
    from vaops.models.attention import _key_flags

    assert _key_flags(None, 300)
    assert _key_flags(torch.ones(1, 1, 1, 300, dtype=torch.bool), 300)  # the ring's live slots
    assert not _key_flags(torch.ones(1, 1, 32, 300, dtype=torch.bool), 300)  # one row a query: dense
    assert not _key_flags(torch.ones(2, 1, 1, 300, dtype=torch.bool), 300)  # one row a robot
    assert not _key_flags(torch.zeros(1, 1, 1, 300), 300)  # an additive bias


def test_pipelining_stages_fit_the_gpus_shared_memory():
    from vaops.models.split_kv import fitting_stages

    action_step = dict(block_m=32, block_n=64, d=128, q_bytes=2, kv_bytes=2)
    assert fitting_stages(227 * 1024, **action_step) == 3  # H100 / H200: the measured fastest
    assert fitting_stages(163 * 1024, **action_step) == 3  # A100
    assert fitting_stages(99 * 1024, **action_step) == 2  # RTX 3090 / 4090: three stages would not fit
