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


def test_fp8_policy_runs_on_a_cpu_close_to_bf16():
    """`vaops serve --fp8` on a CPU (oneDNN's FP8 products): a chunk from the same seed stays within a
    few percent of the bf16 policy's, and is not the bf16 chunk itself (the FP8 path really ran)."""
    import numpy as np
    import pytest

    from vaops.models.checkpoint import build_random_weights

    preset = get_preset("tiny")
    cams = {c.key: np.random.default_rng(0).integers(0, 255, (c.height, c.width, 3), dtype=np.uint8)
            for c in preset.cameras}
    chunks = {}
    for fp8 in (False, True):
        weights = build_random_weights(preset, seed=0, dtype=torch.bfloat16)
        if fp8:
            assert weights.use_fp8() == 10 * len(weights.transformer.blocks)
            assert weights.use_fp8() == 0  # already quantised: `vaops serve --fp8` after a caller's use_fp8
        policy = weights.new_policy()
        policy.reset("transfer the cube", seed=3)
        chunks[fp8] = torch.as_tensor(policy.act(cams).actions).float()
    rel = ((chunks[True] - chunks[False]).norm() / chunks[False].norm()).item()
    assert 0 < rel < 0.05
    with pytest.raises(ValueError, match="fp8 needs the transformer in bfloat16"):
        build_random_weights(preset, seed=0).use_fp8()
    # after a policy was made its graphs hold the bf16 weights' addresses: quantising then is refused
    weights = build_random_weights(preset, seed=0, dtype=torch.bfloat16)
    weights.new_policy()
    with pytest.raises(RuntimeError, match="after 1 policies were made"):
        weights.use_fp8()
    assert not weights.fp8
