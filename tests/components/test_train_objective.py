"""The teacher-forced flow-matching objective: draws, noising, loss."""

import dataclasses

import pytest
import torch

from vaops.components.train.config import TrainConfig
from vaops.components.train.data import Batch
from vaops.components.train.objective import TeacherForcedModel, TeacherForcing, draw_inputs, flow_matching_loss
from vaops.models.attention import MaskedSelfAttention, teacher_forced_mask
from vaops.models.config import get_preset
from vaops.models.flow_matching import train_table
from vaops.models.transformer import build_transformer

TINY = get_preset("tiny")
TF = TeacherForcing.from_config(TrainConfig(), TINY)


def _batch(b=2, f=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 30, f, 16, 1, dtype=torch.bool)
    mask[:, list(TINY.used_action_channels)] = True
    actions = torch.randn(b, 30, f, 16, 1, generator=g) * mask
    return Batch(torch.randn(b, 48, f, 4, 6, generator=g), actions, mask,
                 torch.randn(b, 512, 40, generator=g).to(torch.bfloat16))


def test_tables_use_the_presets_shifts():
    assert torch.equal(TF.video.timesteps, train_table(5.0).timesteps)
    assert torch.equal(TF.action.timesteps, train_table(1.0).timesteps)
    custom = TeacherForcing.from_config(TrainConfig(video_shift=3.0), TINY)
    assert torch.equal(custom.video.sigmas, train_table(3.0).sigmas)


def test_draws_are_a_function_of_the_generator_seed():
    batch, empty = _batch(), torch.zeros(512, 40, dtype=torch.bfloat16)
    a = draw_inputs(batch, empty, TF, torch.Generator().manual_seed(5))
    b = draw_inputs(batch, empty, TF, torch.Generator().manual_seed(5))
    c = draw_inputs(batch, empty, TF, torch.Generator().manual_seed(6))
    assert torch.equal(a.video_noisy, b.video_noisy) and torch.equal(a.action_t, b.action_t)
    assert (a.chunk, a.window) == (b.chunk, b.window)
    assert not torch.equal(a.video_noisy, c.video_noisy)


def test_noising_targets_history_and_masks():
    batch, empty = _batch(b=64, f=4), torch.zeros(512, 40, dtype=torch.bfloat16)
    x = draw_inputs(batch, empty, TF, torch.Generator().manual_seed(1))
    x0, a0, m = batch.latents, batch.actions, batch.action_mask.float()
    # x_t = x0 + sigma * (e - x0) with sigma = t / 1000, one sigma per latent frame
    s = (x.video_t / 1000).view(64, 1, 4, 1, 1)
    torch.testing.assert_close(x.video_noisy, x0 + s * x.video_target, atol=1e-5, rtol=1e-5)
    sa = (x.action_t / 1000).view(64, 1, 4, 1, 1)
    torch.testing.assert_close(x.action_noisy, (a0 + sa * x.action_target) * m, atol=1e-5, rtol=1e-5)
    assert torch.all(x.action_noisy[~batch.action_mask] == 0) and torch.all(x.action_target[~batch.action_mask] == 0)
    # each frame's loss weight is the table's weight at that frame's timestep
    index = (TF.video.timesteps[None] - x.video_t.flatten()[:, None]).abs().argmin(dim=1)
    assert torch.equal(x.video_weight.flatten(), TF.video.weights[index])
    # Noisy history: per sample, clean or noised with timesteps from the less noisy half (indices 500-999).
    noisy = x.video_cond_t.gt(0).any(dim=1)
    assert 16 < noisy.sum() < 48
    assert torch.equal(x.video_clean[~noisy], x0[~noisy])
    assert torch.all(x.video_cond_t[noisy] <= TF.video.timesteps[500] + 1e-4)
    assert torch.all(x.video_cond_t[noisy] > 0)
    assert not torch.allclose(x.video_clean[noisy], x0[noisy])
    torch.testing.assert_close(x.action_clean, a0 * m)  # actions are never noised as history
    assert x.tokens == 64 * 2 * 4 * (6 + 16)


def test_hold_first_frame_mirrors_the_engines_first_chunk():
    """Frame 0 clean at t=0 with no loss weight (video and actions); later frames and every draw unchanged."""
    batch, empty = _batch(b=8, f=4), torch.zeros(512, 40, dtype=torch.bfloat16)
    held = TeacherForcing.from_config(TrainConfig(hold_first_frame=True), TINY)
    x = draw_inputs(batch, empty, held, torch.Generator().manual_seed(3))
    y = draw_inputs(batch, empty, TF, torch.Generator().manual_seed(3))
    assert torch.equal(x.video_noisy[:, :, 0], batch.latents[:, :, 0])
    assert torch.all(x.action_noisy[:, :, 0] == (batch.actions * batch.action_mask)[:, :, 0])
    for name in ("video_t", "video_weight", "action_t", "action_weight"):
        assert torch.all(getattr(x, name)[:, 0] == 0), name
        assert torch.equal(getattr(x, name)[:, 1:], getattr(y, name)[:, 1:]), name
        assert torch.all(getattr(y, name)[:, 0] > 0), name  # the table never draws exactly 0
    assert torch.equal(x.video_noisy[:, :, 1:], y.video_noisy[:, :, 1:])
    assert torch.equal(x.video_clean, y.video_clean) and (x.chunk, x.window) == (y.chunk, y.window)
    # The loss ignores frame 0: any prediction there leaves it unchanged.
    pv, pa = torch.randn_like(x.video_target), torch.randn_like(x.action_target)
    pv2, pa2 = pv.clone(), pa.clone()
    pv2[:, :, 0] += 5
    pa2[:, :, 0] += 5
    torch.testing.assert_close(flow_matching_loss(pv, pa, x), flow_matching_loss(pv2, pa2, x))


def test_text_dropout_chunk_and_window_ranges():
    b = 4000
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.zeros(b, 48, 2, 2, 2), torch.zeros(b, 30, 2, 1, 1), torch.ones(b, 30, 2, 1, 1, dtype=torch.bool),
                  torch.ones(b, 512, 40, dtype=torch.bfloat16))
    x = draw_inputs(batch, torch.zeros(512, 40, dtype=torch.bfloat16), TF, g)
    dropped = (x.text_emb == 0).all(dim=(1, 2)).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.02)
    seen = {(y.chunk, y.window) for y in (draw_inputs(_batch(1, 2), batch.text_emb[0], TF, g) for _ in range(300))}
    chunks, windows = {c for c, _ in seen}, {w for _, w in seen}
    assert chunks == {1, 2, 3, 4} and min(windows) >= 4 and max(windows) <= 64 and len(windows) > 30


def test_loss_is_the_sum_of_per_frame_weighted_terms():
    batch, empty = _batch(), torch.zeros(512, 40, dtype=torch.bfloat16)
    x = draw_inputs(batch, empty, TF, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    vp, ap = torch.randn(x.video_target.shape, generator=g), torch.randn(x.action_target.shape, generator=g)
    total, video, action = flow_matching_loss(vp, ap, x)
    ev = (((vp - x.video_target) ** 2).mean(dim=(1, 3, 4)) * x.video_weight).mean()
    m = x.action_mask.float()
    per_frame = (((ap - x.action_target) ** 2) * m).sum(dim=(1, 3, 4)) / m.sum(dim=(1, 3, 4))
    ea = (per_frame * x.action_weight).mean()
    torch.testing.assert_close(video, ev)
    torch.testing.assert_close(action, ea)
    torch.testing.assert_close(total, ev + ea)


def test_model_wraps_the_teacher_forced_forward():
    model = build_transformer(TINY.transformer, seed=0)
    x = draw_inputs(_batch(), torch.zeros(512, 40, dtype=torch.bfloat16), TF, torch.Generator().manual_seed(4))
    x = x.to("cpu", torch.float32)
    with torch.no_grad():
        loss = TeacherForcedModel(model)(x)
        mask = teacher_forced_mask(3, 6, 3, 16, x.chunk, x.window)
        vp, ap = model.forward_train(x.video_noisy, x.video_clean, x.video_t, x.video_cond_t, x.action_noisy,
                                     x.action_clean, x.action_t, torch.zeros_like(x.action_t), x.text_emb,
                                     MaskedSelfAttention(mask))
    torch.testing.assert_close(loss, flow_matching_loss(vp, ap, x))


def _fd_step(fd_chunks, **changes):
    """Tiny-model inputs in 3 chunks of 1 frame (window 8), with the given FD choice [2, 3] or None."""
    x = draw_inputs(_batch(), torch.zeros(512, 40, dtype=torch.bfloat16), TF, torch.Generator().manual_seed(4))
    return dataclasses.replace(x.to("cpu", torch.float32), chunk=1, window=8, fd_chunks=fd_chunks, **changes)


def test_forward_dynamics_draws_chunks_last_and_from_the_generator():
    batch, empty = _batch(b=64, f=4), torch.zeros(512, 40, dtype=torch.bfloat16)
    fd = TeacherForcing.from_config(TrainConfig(forward_dynamics_prob=0.25), TINY)
    a, b, c = (draw_inputs(batch, empty, fd, torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    off = draw_inputs(batch, empty, TF, torch.Generator().manual_seed(7))
    assert off.fd_chunks is None  # p = 0: no FD segment, every draw as before
    assert a.fd_chunks is not None and b.fd_chunks is not None and c.fd_chunks is not None
    assert a.fd_chunks.shape == (64, -(-4 // a.chunk)) and a.fd_chunks.dtype == torch.bool
    assert torch.equal(a.fd_chunks, b.fd_chunks) and not torch.equal(a.fd_chunks, c.fd_chunks)
    assert 0.15 < a.fd_chunks.float().mean() < 0.35
    for f in dataclasses.fields(off):  # drawn last: everything else is what p = 0 draws
        if f.name != "fd_chunks":
            v, w = getattr(a, f.name), getattr(off, f.name)
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, f.name
    assert a.tokens == off.tokens + 64 * 4 * 16  # plus the FD copy of the actions
    with pytest.raises(ValueError, match="forward_dynamics_prob"):
        TrainConfig(forward_dynamics_prob=1.5)


def test_forward_dynamics_shows_a_chunks_video_its_actions_and_nothing_of_its_own_clean_video():
    model = TeacherForcedModel(build_transformer(TINY.transformer, seed=0))
    every = torch.ones(2, 3, dtype=torch.bool)
    x = _fd_step(every)
    video_clean, action_clean = x.video_clean.requires_grad_(), x.action_clean.requires_grad_()
    video, _ = model.predict(x)
    video[:, :, 1].square().sum().backward()  # chunk 1's noisy-video output
    vg, ag = video_clean.grad, action_clean.grad
    assert vg is not None and ag is not None
    assert torch.all(vg[:, :, 1:] == 0) and vg[:, :, 0].abs().sum() > 0  # the history only
    assert torch.all(ag[:, :, 2] == 0) and ag[:, :, 1].abs().sum() > 0 and ag[:, :, 0].abs().sum() > 0
    # Moving chunk 1's actions moves its video with FD, and leaves it bit for bit without.
    moved = x.action_clean.detach().clone()
    moved[:, :, 1] += x.action_mask[:, :, 1].float()
    with torch.no_grad():
        for fd_chunks, seen in ((every, True), (None, False)):
            before = model.predict(_fd_step(fd_chunks))[0][:, :, 1]
            after = model.predict(_fd_step(fd_chunks, action_clean=moved))[0][:, :, 1]
            assert torch.equal(before, after) is not seen, fd_chunks


def test_forward_dynamics_segment_is_invisible_to_chunks_not_chosen():
    """With no chunk chosen the FD tokens change no prediction, and the loss stays the flow-matching loss."""
    model = TeacherForcedModel(build_transformer(TINY.transformer, seed=0))
    with torch.no_grad():
        plain = model.predict(_fd_step(None))
        unchosen = model.predict(_fd_step(torch.zeros(2, 3, dtype=torch.bool)))
        chosen = _fd_step(torch.tensor([[False, True, False], [False, False, False]]))
        some = model.predict(chosen)
        loss = model(chosen)
    for p, u in zip(plain, unchosen):
        torch.testing.assert_close(u, p)
    torch.testing.assert_close(loss, flow_matching_loss(*some, chosen))
    torch.testing.assert_close(some[0][1], plain[0][1])  # sample 1 chose nothing
    torch.testing.assert_close(some[0][0, :, 0], plain[0][0, :, 0])  # sample 0's chunk 0 was not chosen
    assert not torch.allclose(some[0][0, :, 1], plain[0][0, :, 1])  # its chunk 1 was
