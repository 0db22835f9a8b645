"""Training's flex-attention masks: one compiled kernel for every (chunk, window) a step draws."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from vaops.models import attention


@pytest.mark.filterwarnings("ignore")
def test_flex_masks_compile_once_and_equal_the_dense_mask():
    # The trainer draws chunk 1-4 and window 4-64 per step. With the window compiled into the kernel
    # as a Python number, vaops train recompiled at almost every step on 2 H200 (7 s a step against
    # 0.75 s; bench/results/train_shipped_h200x2.md).
    torch._dynamo.reset()
    counters.clear()
    q = torch.randn(1, 2, 512, 16, generator=torch.Generator().manual_seed(0))  # 2 x 4 x 48 + 2 x 4 x 16 tokens
    for chunk, window in [(1, 4), (2, 8), (3, 64), (4, 5)]:
        block_mask = attention.teacher_forced_block_mask(4, 48, 4, 16, chunk, window, device="cpu")
        out = attention._flex()(q, q, q, block_mask=block_mask)
        dense = attention.teacher_forced_mask(4, 48, 4, 16, chunk, window, device="cpu")
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=dense))
    assert counters["stats"]["unique_graphs"] == 1
