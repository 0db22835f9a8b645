import torch

from vaops.models.config import get_preset
from vaops.models.fp8 import FP8Linear, quantize_blocks_fp8
from vaops.models.transformer import build_transformer


def test_fp8_linear_close_to_bf16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).to(torch.bfloat16)
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    ref = linear(x).float()
    out = FP8Linear(linear)(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05


def test_fp8_linear_scales_each_token_and_channel():
    """A token 1e6 times smaller than its neighbour, and an output channel 1e4 times smaller than the
    others, keep their own precision (one scale for the whole tensor would flush them to zero)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 64).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight[0] *= 1e-4
        linear.bias.zero_()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    x[0] *= 1e-3
    x[1] *= 1e3
    ref = linear(x).float()
    out = FP8Linear(linear)(x).float()
    for row in range(2):
        assert ((out[row] - ref[row]).norm() / ref[row].norm()).item() < 0.05
    assert ((out[:, 0] - ref[:, 0]).norm() / ref[:, 0].norm()).item() < 0.05


def test_quantize_blocks_swaps_every_block_linear():
    model = build_transformer(get_preset("tiny").transformer, dtype=torch.bfloat16)
    # per block: attn1 q,k,v,out + attn2 q,k,v,out + ffn up, down
    assert quantize_blocks_fp8(model) == 10 * len(model.blocks)
    assert isinstance(model.blocks[0].ffn.net[2], FP8Linear)
    assert isinstance(model.proj_out, torch.nn.Linear)
