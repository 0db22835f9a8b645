import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vaops.models.config import TINY_VAE
from vaops.models.vae import (
    StreamingEncoder,
    build_vae,
    decode,
    denormalize_latents,
    latent_stats,
    load_vae,
    normalize_latents,
    save_vae,
    write_folder_atomically,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def vae():
    return build_vae(TINY_VAE, seed=0)


@pytest.fixture(scope="module")
def clip():
    return torch.rand(2, 3, 13, 64, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def whole_mu(vae, clip):
    with torch.no_grad():
        return vae.encode(clip).latent_dist.mean


@pytest.fixture(scope="module")
def saved(vae, tmp_path_factory):
    return save_vae(vae, tmp_path_factory.mktemp("ckpt") / "vae")


@pytest.mark.parametrize("chunks", [(1, 12), (5, 4, 4), (9, 4), (13,)])
def test_streaming_equals_whole_clip(vae, clip, whole_mu, chunks):
    stream = StreamingEncoder(vae)
    outs, start = [], 0
    for n in chunks:
        outs.append(stream.encode(clip[:, :, start:start + n]))
        start += n
    assert [o.shape[2] for o in outs] == [1 + (chunks[0] - 1) // 4] + [n // 4 for n in chunks[1:]]
    streamed = torch.cat(outs, dim=2)
    assert streamed.shape == whole_mu.shape == (2, 48, 4, 4, 5)
    assert (streamed - whole_mu).abs().max().item() <= 1e-5
    assert stream.frames_seen == 13


def test_reset_forgets_the_previous_clip(vae, clip, whole_mu):
    stream = StreamingEncoder(vae)
    other = torch.flip(clip, dims=[2])
    stream.encode(other[:, :, :5])
    stream.reset()
    out = torch.cat([stream.encode(clip[:, :, :5]), stream.encode(clip[:, :, 5:9])], dim=2)
    assert (out - whole_mu[:, :, :3]).abs().max().item() <= 1e-5


def test_streaming_is_causal(vae, clip, whole_mu):
    """Later frames never change earlier latents."""
    changed = clip.clone()
    changed[:, :, 9:] = -changed[:, :, 9:]
    stream = StreamingEncoder(vae)
    first = stream.encode(changed[:, :, :9])
    assert (first - whole_mu[:, :, :3]).abs().max().item() <= 1e-5
    assert (stream.encode(changed[:, :, 9:]) - whole_mu[:, :, 3:]).abs().max().item() > 1e-3


def test_streaming_rejects_wrong_chunk_sizes(vae, clip):
    stream = StreamingEncoder(vae)
    with pytest.raises(ValueError, match="1 \\+ 4k frames, got 4"):
        stream.encode(clip[:, :, :4])
    stream.encode(clip[:, :, :1])
    with pytest.raises(ValueError, match="4k frames .* got 3"):
        stream.encode(clip[:, :, 1:4])
    with pytest.raises(ValueError, match="\\[B, 3, T, H, W\\]"):
        stream.encode(clip[0])


def test_normalisation_round_trip(vae, whole_mu):
    mean, std = latent_stats(vae)
    assert len(mean) == len(std) == 48
    assert min(std) >= 0.4 and max(std) <= 1.6 and len(set(std)) > 40 and len(set(mean)) > 40
    z = normalize_latents(whole_mu, mean, std)
    expected = (whole_mu - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    assert (z - expected).abs().max().item() <= 1e-6
    assert (denormalize_latents(z, mean, std) - whole_mu).abs().max().item() <= 1e-6
    z16 = normalize_latents(whole_mu.bfloat16(), mean, std)
    assert z16.dtype == torch.bfloat16
    assert (z16.float() - expected).abs().max().item() <= 0.05


def test_decode_denormalises_then_decodes(vae, whole_mu):
    z = normalize_latents(whole_mu, *latent_stats(vae))
    video = decode(vae, z)
    assert video.shape == (2, 3, 13, 64, 80)
    assert video.min().item() >= -1 and video.max().item() <= 1
    with torch.no_grad():
        direct = vae.decode(whole_mu).sample
    assert (video - direct).abs().max().item() <= 1e-5


def test_build_is_deterministic_in_seed():
    a, b, c = build_vae(TINY_VAE, seed=3), build_vae(TINY_VAE, seed=3), build_vae(TINY_VAE, seed=4)
    assert latent_stats(a) == latent_stats(b) != latent_stats(c)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["encoder.conv_in.weight"], pc["encoder.conv_in.weight"])


def test_save_load_round_trip(vae, clip, whole_mu, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", WEIGHTS]
    loaded = load_vae(saved)
    assert latent_stats(loaded) == latent_stats(vae)
    with torch.no_grad():
        mu = loaded.encode(clip).latent_dist.mean
    assert torch.equal(mu, whole_mu)
    as_bf16 = load_vae(saved, dtype=torch.bfloat16)
    assert next(as_bf16.parameters()).dtype == torch.bfloat16


def test_save_replaces_existing_folder_atomically(vae, tmp_path):
    target = tmp_path / "vae"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_vae(vae, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_failed_write_keeps_the_existing_folder(tmp_path):
    target = tmp_path / "vae"
    target.mkdir()
    (target / "config.json").write_text("{}")

    def fail(tmp):
        (tmp / "config.json").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(target, fail)
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def _copy(saved, tmp_path):
    dst = tmp_path / "vae"
    shutil.copytree(saved, dst)
    return dst


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: VAE folder does not exist"):
        load_vae(tmp_path / "nope")


def test_load_missing_config(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_vae(folder)


def test_load_invalid_config(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_vae(folder)


def test_load_wrong_class(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "WanTransformer3DModel"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="_class_name is 'WanTransformer3DModel'"):
        load_vae(folder)


def test_load_missing_weights(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no VAE weights"):
        load_vae(folder)


def test_load_truncated_weights(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    with open(folder / WEIGHTS, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=f"{folder}: cannot load the VAE"):
        load_vae(folder)


def test_load_lists_missing_and_unexpected_tensors(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    state = load_file(folder / WEIGHTS)
    del state["decoder.conv_in.bias"]
    state["extra.weight"] = torch.zeros(3)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing_keys: \\['decoder.conv_in.bias'\\]; "
                                         "unexpected_keys: \\['extra.weight'\\]"):
        load_vae(folder)


def test_load_misshapen_tensors(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["base_dim"] = 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="encoder.conv_in"):
        load_vae(folder)


def test_a_cpu_encode_and_decode_of_one_sample_run_onednn_convolutions(vae, clip, monkeypatch):
    """PyTorch sends these batch-1 3D convolutions to its slow path (vaops.models.vae.OneDNNConv3d says
    why); the VAE's streaming encode and its decode call oneDNN for them instead, with the same numbers."""
    import vaops.models.vae as vae_module

    calls = []
    onednn = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(a[0].shape) or onednn(*a))
    one = clip[:1]
    results = {}
    for on in (False, True):
        monkeypatch.setattr(vae_module, "ONEDNN_CPU_CONV3D", on)
        calls.clear()
        stream = StreamingEncoder(vae)
        mu = torch.cat([stream.encode(one[:, :, :5]), stream.encode(one[:, :, 5:9])], dim=2)
        results[on] = mu, decode(vae, normalize_latents(mu, *latent_stats(vae))), len(calls)
    (mu_off, video_off, n_off), (mu_on, video_on, n_on) = results[False], results[True]
    assert n_off == 0 and n_on > 20  # every causal convolution of the encoder and the decoder
    assert torch.allclose(mu_on, mu_off, rtol=1e-4, atol=1e-5)
    assert torch.allclose(video_on, video_off, rtol=1e-4, atol=1e-5)
