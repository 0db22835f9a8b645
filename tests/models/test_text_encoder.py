import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vaops.models.config import TINY_TEXT, get_preset
from vaops.models.text_encoder import (
    TEXT_ENCODER_SUBFOLDER,
    TOKENIZER_SUBFOLDER,
    build_text_encoder,
    build_tokenizer,
    load_text_encoder,
)

PROMPTS = ["pick the red cube and place it in the bowl", "Stack 3 blocks!"]


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder(TINY_TEXT, seed=0)


@pytest.fixture(scope="module")
def saved(encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    encoder.save(root / TEXT_ENCODER_SUBFOLDER, root / TOKENIZER_SUBFOLDER)
    return root


def _seq_lens(encoder, prompts):
    return [len(encoder.tokenizer(p).input_ids) for p in prompts]


def test_dim_matches_the_tiny_transformer(encoder):
    assert encoder.dim == get_preset("tiny").transformer.text_dim == 40
    assert encoder.max_length == 512


def test_zero_padding_past_the_prompt(encoder):
    emb = encoder.encode(PROMPTS)
    assert emb.shape == (2, 512, 40) and emb.dtype == torch.float32
    lens = _seq_lens(encoder, PROMPTS)
    assert lens[0] > lens[1] > 2
    for i, n in enumerate(lens):
        assert (emb[i, :n].abs().sum(-1) > 0).all()
        assert torch.equal(emb[i, n:], torch.zeros_like(emb[i, n:]))
        tokens = encoder.tokenizer([PROMPTS[i]], padding="max_length", max_length=512, return_tensors="pt")
        with torch.no_grad():
            raw = encoder.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        assert (emb[i, :n] - raw[0, :n]).abs().max().item() <= 1e-6
        assert raw[0, n:].abs().sum() > 0


def test_batch_members_are_independent(encoder):
    both = encoder.encode(PROMPTS)
    alone = encoder.encode(PROMPTS[1:])
    assert (both[1] - alone[0]).abs().max().item() <= 1e-5


def test_prompts_are_cleaned_like_diffusers(encoder):
    messy = encoder.encode(["  pick &amp; place\n the   cube  "])
    clean = encoder.encode(["pick & place the cube"])
    assert torch.equal(messy, clean)


def test_empty_prompt_is_only_the_end_token(encoder):
    empty = encoder.empty_prompt_embedding()
    assert empty.shape == (1, 512, 40)
    assert empty[0, 0].abs().sum() > 0
    assert torch.equal(empty[0, 1:], torch.zeros(511, 40))
    assert torch.equal(empty, encoder.encode([""]))


def test_long_prompts_are_truncated_to_max_length(encoder):
    emb = encoder.encode(["pick " * 600])
    assert emb.shape == (1, 512, 40)
    assert (emb[0].abs().sum(-1) > 0).all()


def test_rejects_a_bare_string(encoder):
    with pytest.raises(TypeError, match="list of str"):
        encoder.encode("pick the cube")


def test_build_is_deterministic_in_seed():
    a, b, c = (build_text_encoder(TINY_TEXT, seed=s).encode(PROMPTS) for s in (1, 1, 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tokenizer_is_t5_shaped():
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("Pick the cube").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[-3:-1] == ["\u2581the", "\u2581cube"]


def test_identical_after_save_and_load(encoder, saved):
    assert sorted(p.name for p in saved.iterdir()) == [TEXT_ENCODER_SUBFOLDER, TOKENIZER_SUBFOLDER]
    loaded = load_text_encoder(saved / TEXT_ENCODER_SUBFOLDER, saved / TOKENIZER_SUBFOLDER)
    assert torch.equal(loaded.encode(PROMPTS), encoder.encode(PROMPTS))
    assert loaded.tokenizer(PROMPTS).input_ids == encoder.tokenizer(PROMPTS).input_ids
    bf16 = load_text_encoder(saved / TEXT_ENCODER_SUBFOLDER, saved / TOKENIZER_SUBFOLDER, dtype=torch.bfloat16)
    half = bf16.encode(PROMPTS)
    assert half.dtype == torch.bfloat16
    # bf16 as upstream runs it (and a GPU server beside a bf16 transformer): close to fp32, zeros kept exact
    full = encoder.encode(PROMPTS)
    assert ((half.float() - full).norm() / full.norm()).item() < 2e-2
    assert torch.equal(half.float().abs().sum(-1) == 0, full.abs().sum(-1) == 0)  # the same tokens padded


def _copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt" / TEXT_ENCODER_SUBFOLDER, tmp_path / "ckpt" / TOKENIZER_SUBFOLDER


def test_load_missing_folders(saved, tmp_path):
    te, tok = saved / TEXT_ENCODER_SUBFOLDER, saved / TOKENIZER_SUBFOLDER
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: text encoder folder does not exist"):
        load_text_encoder(tmp_path / "nope", tok)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: tokenizer folder does not exist"):
        load_text_encoder(te, tmp_path / "nope")


def test_load_corrupt_tokenizer(saved, tmp_path):
    te, tok = _copy(saved, tmp_path)
    (tok / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=f"{tok}: cannot load the tokenizer"):
        load_text_encoder(te, tok)


def test_load_truncated_weights(saved, tmp_path):
    te, tok = _copy(saved, tmp_path)
    with open(te / "model.safetensors", "r+b") as f:
        f.truncate(500)
    with pytest.raises(ValueError, match=f"{te}: cannot load the text encoder"):
        load_text_encoder(te, tok)


def test_load_lists_missing_tensors(saved, tmp_path):
    te, tok = _copy(saved, tmp_path)
    state = load_file(te / "model.safetensors")
    name = next(k for k in state if k.endswith("layer_norm.weight"))
    del state[name]
    save_file(state, te / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"missing_keys: \\[.*{name}"):
        load_text_encoder(te, tok)
