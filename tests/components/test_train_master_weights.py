"""MasterWeightAdamW: the fp32 masters follow torch's AdamW exactly, and its state round-trips."""

import io

import pytest
import torch

from vaops.components.train.master_weights import MasterWeightAdamW

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.nn.Parameter(torch.randn(8, 5, generator=g).to(torch.bfloat16))
    full = torch.nn.Parameter(torch.randn(5, generator=g))  # an fp32 parameter is its own master
    return [low, full]


def grads_for(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(8, 5, generator=g).to(torch.bfloat16), torch.randn(5, generator=g)]


def test_masters_follow_fp32_adamw_and_weights_are_their_bf16_copies():
    params = make_params()
    opt = MasterWeightAdamW(params, fused=False, **HYPER)
    ref_params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, **HYPER)
    for step in range(4):
        for p, r, g in zip(params, ref_params, grads_for(step)):
            p.grad, r.grad = g.clone(), g.float()
        for group in (opt.param_groups[0], ref.param_groups[0]):
            group["lr"] = HYPER["lr"] / (step + 1)  # as an LR schedule would set it
        opt.step()
        ref.step()
        torch.testing.assert_close(opt.low_masters[0], ref_params[0].detach(), rtol=0, atol=0)
        torch.testing.assert_close(params[1].detach(), ref_params[1].detach(), rtol=0, atol=0)
        assert params[0].dtype == torch.bfloat16
        assert torch.equal(params[0].detach(), ref_params[0].detach().to(torch.bfloat16))


def test_state_round_trip_continues_identically():
    a_params = make_params()
    a = MasterWeightAdamW(a_params, fused=False, **HYPER)
    for step in range(2):
        for p, g in zip(a_params, grads_for(step)):
            p.grad = g
        a.step()
    b_params = [torch.nn.Parameter(p.detach().clone()) for p in a_params]
    b = MasterWeightAdamW(b_params, fused=False, **HYPER)
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)  # as a checkpoint would: no tensor shared with `a`
    saved.seek(0)
    b.load_state_dict(torch.load(saved))
    for p, q, g in zip(a_params, b_params, grads_for(2)):
        p.grad, q.grad = g, g.clone()
    a.step()
    b.step()
    for p, q in zip(a_params, b_params):
        assert torch.equal(p.detach(), q.detach())
    assert torch.equal(a.low_masters[0], b.low_masters[0])


def test_bad_use_is_refused():
    params = make_params()
    opt = MasterWeightAdamW(params, fused=False, **HYPER)
    with pytest.raises(RuntimeError, match="every bf16 parameter needs a gradient"):
        opt.step()
    other = MasterWeightAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], fused=False, **HYPER)
    with pytest.raises(ValueError, match="holds 1 fp32 masters, the model has 0"):
        MasterWeightAdamW([torch.nn.Parameter(torch.zeros(3))], fused=False, **HYPER).load_state_dict(
            other.state_dict())


def test_chunked_gradient_buffer_steps_every_master_once():
    """Masters stepped chunk by chunk through one small fp32 gradient buffer (several tensors, one
    larger than a chunk, an fp32 parameter between them) follow one whole-model fp32 AdamW exactly."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (5,), (7, 2), (3,), (2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16 if i != 3 else torch.float32))
              for i, s in enumerate(shapes)]
    opt = MasterWeightAdamW(params, fused=False, chunk_numel=13, **HYPER)
    assert opt.chunks == [(0, 1), (1, 2), (2, 3), (3, 4)]  # bf16 tensors of 12, 5, 14 (alone) and 4 elements
    assert opt.grad_views[0].untyped_storage().size() == 14 * 4  # the largest chunk's fp32 bytes
    ref_params = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ref = torch.optim.AdamW(ref_params, **HYPER)
    for step in range(3):
        for p, r in zip(params, ref_params):
            grad = torch.randn(p.shape, generator=g)
            p.grad, r.grad = grad.to(p.dtype), grad.to(p.dtype).float()
        opt.step()
        ref.step()
        assert all(m.grad is None for m in opt.low_masters)
        masters = iter(opt.low_masters)
        for p, r in zip(params, ref_params):
            got = p.detach() if p.dtype == torch.float32 else next(masters)
            torch.testing.assert_close(got, r.detach(), rtol=0, atol=0)
    assert all(int(s["step"]) == 3 for s in opt.adamw.state.values())
