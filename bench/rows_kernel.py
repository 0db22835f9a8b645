"""models/split_kv.py's row-table kernels on a GPU: a batch of robots' action-pass attention read from each robot's
own KV cache in one launch (`split_kv_rows`, with `store_rows` writing their new entries), against one
`split_kv_attention` call (and two stores) per robot, in the same process; and each row's output against PyTorch's
attention over that robot's cache.

Shapes of the robotwin preset's action pass: 32 queries, 24 heads of 128, caches of 9,792 slots (one layer each),
half the robots' caches full, the others filling or evicted (under their live-slot flags).

    python bench/rows_kernel.py --robots 1,2,4,8 --out bench/results/rows_kernel_h200.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vaops.models.split_kv import ROW_FIELDS, split_kv_attention, split_kv_rows, store_rows


def timed(fn, reps: int = 50) -> float:
    """Median milliseconds of a CUDA graph of `fn` (as the served passes replay it)."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robots", default="1,2,4,8")
    parser.add_argument("--capacity", type=int, default=9792)
    parser.add_argument("--out")
    args = parser.parse_args()
    dev, dt, h, d, m, cap = "cuda", torch.bfloat16, 24, 128, 32, args.capacity
    rows = []
    for n in [int(r) for r in args.robots.split(",")]:
        g = torch.Generator(device=dev).manual_seed(n)
        caches = [(torch.randn(1, cap, h, d, device=dev, dtype=dt, generator=g),
                   torch.randn(1, cap, h, d, device=dev, dtype=dt, generator=g)) for _ in range(n)]
        flags = [torch.rand(cap, device=dev, generator=g) > 0.2 for _ in range(n)]
        anchor = torch.zeros(64, device=dev, dtype=dt)
        ones = torch.ones(cap, device=dev, dtype=torch.uint8)
        keys = [cap if r % 2 == 0 else cap // 2 + 17 * r for r in range(n)]
        masked = [r % 4 == 3 for r in range(n)]
        table = torch.tensor([[(k.data_ptr() - anchor.data_ptr()) // 2, (v.data_ptr() - anchor.data_ptr()) // 2,
                               flags[r].data_ptr() - ones.data_ptr() if masked[r] else 0, keys[r], (97 * r) % cap]
                              for r, (k, v) in enumerate(caches)], device=dev, dtype=torch.int64)
        assert table.shape[1] == ROW_FIELDS.value
        q = torch.randn(n, m, h, d, device=dev, dtype=dt, generator=g)
        new_k, new_v = (torch.randn(n, m, h, d, device=dev, dtype=dt, generator=g) for _ in range(2))
        strides = (caches[0][0].stride(1), caches[0][0].stride(2))

        def batched():
            store_rows(new_k, new_v, anchor, anchor, table, cap, strides, strides)
            return split_kv_rows(q, anchor, anchor, ones, table, cap, strides, strides)

        def one_by_one():
            outs = []
            for r, (k, v) in enumerate(caches):
                s = (97 * r) % cap
                k[0, s:s + m].copy_(new_k[r])  # no wrap at these slots: the stores a robot's own pass makes
                v[0, s:s + m].copy_(new_v[r])
                outs.append(split_kv_attention(q[r:r + 1], k[:, :keys[r]], v[:, :keys[r]],
                                               flags[r][:keys[r]] if masked[r] else None))
            return torch.cat(outs)

        out = batched()
        err = 0.0
        for r, (k, v) in enumerate(caches):
            mask = flags[r][:keys[r]].view(1, 1, 1, -1) if masked[r] else None
            ref = F.scaled_dot_product_attention(q[r:r + 1].transpose(1, 2).float(), k[:, :keys[r]].transpose(1, 2).float(),
                                                 v[:, :keys[r]].transpose(1, 2).float(), attn_mask=mask).transpose(1, 2)
            err = max(err, (out[r:r + 1].float() - ref).abs().max().item())
        stored = all(torch.equal(k[0, (97 * r) % cap:(97 * r) % cap + m], new_k[r]) for r, (k, _) in enumerate(caches))
        row = {"robots": n, "rows_ms": timed(batched), "one_by_one_ms": timed(one_by_one), "max_abs_err_vs_sdpa_fp32": err,
               "stored": stored}
        row["x_one_by_one"] = row["one_by_one_ms"] / row["rows_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        out_path = Path(args.out)
        out_path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
