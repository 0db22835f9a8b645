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


# 4 video frames of 3 tokens, 4 action frames of 2 tokens, in chunks of 1 frame: blocks 0-7
FD_SHAPE = (4, 3, 4, 2, 1)


def test_forward_dynamics_tokens_see_the_history_and_only_chosen_video_sees_them():
    """The FD action tokens of chunk t read the clean blocks < 2t within the window (never chunk t's
    clean video) and their own chunk's FD tokens; only chosen chunks' noisy video reads them."""
    layout = attention.teacher_forced_layout(*FD_SHAPE, forward_dynamics=True)
    block, clean, fd = layout.block, layout.clean, layout.fd
    chosen = torch.tensor([[True, False, True, True], [False, True, False, False]])
    for window in (2, 3, 64):
        mask = attention.forward_dynamics_mask(*FD_SHAPE, window, chosen)[:, 0]
        base = attention.teacher_forced_mask(*FD_SHAPE, window)
        n = base.shape[0]
        assert mask.shape == (2, n + 4 * 2, n + 4 * 2) and torch.equal(fd[n:], torch.ones(8, dtype=torch.bool))
        assert torch.equal(mask[:, :n, :n], base.expand(2, n, n))  # the rest of the mask is unchanged
        for b in range(2):
            for t in range(4):
                own = fd & (block == 2 * t)
                history = ~fd & clean & (block < 2 * t) & (block >= 2 * t - window)
                assert torch.equal(mask[b][own], (history | own).expand(int(own.sum()), -1)), (b, t, window)
                readers = own | (chosen[b, t] & ~clean & (block == 2 * t))
                assert torch.equal(mask[b][:, own].any(dim=1), readers), (b, t, window)
                # a reader sees every FD token of its chunk and no other
                assert torch.equal(mask[b][readers][:, fd], own[fd].expand(int(readers.sum()), -1))


@pytest.mark.filterwarnings("ignore")
def test_forward_dynamics_flex_masks_compile_once_and_equal_the_dense_mask():
    # One kernel for every draw: the chosen chunks enter the mask as a tensor, like the window.
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 4 * (2 * 48 + 3 * 16), 16, generator=g)  # 2 samples, FD adds 4 x 16 tokens
    for chunk, window in [(1, 4), (2, 8), (3, 64), (4, 5)]:
        chosen = torch.rand(2, -(-4 // chunk), generator=g) < 0.5
        block_mask = attention.forward_dynamics_block_mask(4, 48, 4, 16, chunk, window, chosen, device="cpu")
        out = attention._flex()(q, q, q, block_mask=block_mask)
        dense = attention.forward_dynamics_mask(4, 48, 4, 16, chunk, window, chosen)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=dense))
    assert counters["stats"]["unique_graphs"] == 1
