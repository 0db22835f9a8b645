import json
import shutil

import pytest
import torch

from vaops.models.attention import MaskedSelfAttention, teacher_forced_mask
from vaops.models.config import PRESETS, TransformerConfig, get_preset
from vaops.models.transformer import (CheckpointError, build_transformer, count_parameters, load_transformer,
                                      save_transformer)


def test_robotwin_parameter_count_on_meta():
    model = build_transformer(get_preset("robotwin").transformer, device="meta")
    assert round(count_parameters(model) / 1e9, 2) == 5.09


def test_presets_have_consistent_sizes():
    for preset in PRESETS.values():
        assert len(preset.norm_q01) == len(preset.norm_q99) == preset.transformer.action_dim
        assert all(0 <= c < preset.transformer.action_dim for c in preset.used_action_channels)
        h, w = preset.latent_hw
        assert h > 0 and w > 0 and h % 2 == 0 and w % 2 == 0
    assert get_preset("robotwin").latent_hw == (24, 20)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    video = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    actions = torch.randn(1, cfg.action_dim, 2, 3, 1, generator=g)
    t = torch.full((1, 2), 500.0)
    text = torch.randn(1, 8, cfg.text_dim, generator=g)
    mask = teacher_forced_mask(2, 4, 2, 3, 1, 4)
    with torch.no_grad():
        return model.forward_train(video, video, t, t * 0, actions, actions, t, t * 0, text, MaskedSelfAttention(mask))


def test_inference_chain_of_regions_is_the_block_by_block_forward(monkeypatch):
    """Inference cuts the compiled regions at the attention calls only (block i's FFN and block i+1's
    attention input as one); the same operations in the same order give the same numbers as the
    block-by-block forward training runs, and with gradients enabled the blocks run one by one."""
    import vaops.models.transformer as transformer_module

    model = build_transformer(get_preset("tiny").transformer, seed=0)
    chained = _forward(model)
    monkeypatch.setattr(transformer_module, "CHAIN_REGIONS", False)
    assert all(torch.equal(a, b) for a, b in zip(chained, _forward(model)))
    monkeypatch.setattr(transformer_module, "CHAIN_REGIONS", True)
    calls = []
    monkeypatch.setattr(transformer_module.LingBotVATransformer, "_chain", lambda *a: calls.append(a))
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    video, t = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g), torch.full((1, 2), 500.0)
    actions, text = torch.randn(1, cfg.action_dim, 2, 3, 1, generator=g), torch.randn(1, 8, cfg.text_dim, generator=g)
    model.forward_train(video, video, t, t * 0, actions, actions, t, t * 0, text,
                        MaskedSelfAttention(teacher_forced_mask(2, 4, 2, 3, 1, 4)))
    assert not calls  # gradients enabled: block by block


def test_checkpoint_round_trip(tmp_path):
    model = build_transformer(get_preset("tiny").transformer, seed=3)
    save_transformer(model, tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel"
    loaded = load_transformer(tmp_path / "transformer")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(_forward(model), _forward(loaded)):
        assert torch.equal(a, b)
    # Saving again over an existing folder replaces it whole.
    save_transformer(build_transformer(get_preset("tiny").transformer, seed=4), tmp_path / "transformer")
    assert not torch.equal(load_transformer(tmp_path / "transformer").proj_out.weight, model.proj_out.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]


def test_attn_mode_needs_no_edit(tmp_path):
    model = build_transformer(get_preset("tiny").transformer)
    save_transformer(model, tmp_path / "t")
    for mode in ("flex", "torch", "flashattn"):
        cfg = json.loads((tmp_path / "t" / "config.json").read_text())
        cfg["attn_mode"] = mode
        (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
        load_transformer(tmp_path / "t")


def test_bf16_keeps_modulation_in_fp32():
    model = build_transformer(get_preset("tiny").transformer, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    assert model.scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.condition_embedder.time_proj.weight.dtype == torch.bfloat16


@pytest.fixture
def saved(tmp_path):
    save_transformer(build_transformer(get_preset("tiny").transformer), tmp_path / "transformer")
    return tmp_path / "transformer"


def test_mismatched_checkpoint_lists_names(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["ffn_dim"] = 64
    cfg["num_layers"] = 1
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_transformer(saved)
    msg = str(e.value)
    assert str(saved) in msg
    assert "unexpected" in msg and "blocks.1.attn1.to_q.weight" in msg
    assert "misshapen" in msg and "blocks.0.ffn.net.0.proj.weight: file (96, 48) vs model (64, 48)" in msg


def test_missing_tensor_is_named(saved):
    from safetensors.torch import load_file, save_file

    weights = saved / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["action_proj_out.bias"]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing \(1\): action_proj_out.bias"):
        load_transformer(saved)


def test_corrupt_weights_and_config(saved, tmp_path):
    weights = saved / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_transformer(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_transformer(saved)
    (saved / "config.json").write_text(json.dumps({"num_layers": 2, "bogus_key": 1}))
    with pytest.raises(ValueError, match=r"config.json: unknown field\(s\) 'bogus_key'; allowed: num_layers"):
        load_transformer(saved)
    shutil.rmtree(saved)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_transformer(saved)


def test_sharded_checkpoint_loads(saved):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved / "diffusion_pytorch_model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(saved / fname))
    (saved / "diffusion_pytorch_model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (saved / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_transformer(saved)
    assert torch.equal(loaded.proj_out.weight, state["proj_out.weight"])


def test_unknown_config_key_source_is_named():
    with pytest.raises(ValueError, match="cfg.json"):
        TransformerConfig.from_json_dict({"foo": 1}, source="cfg.json")


def test_compiled_regions_reduce_the_blocks_3072_wide_rows_in_one_pass(monkeypatch):
    """models/transformer.py's heuristics handler, as inductor consults it while generating a region's
    Triton kernels: rows reduced along their inner dimension (norms, FP8 row scales) of up to WHOLE_ROWS
    elements in one pass (inductor alone stops at 1,024: the blocks' rows are 3,072 wide); anything else,
    and everything with WHOLE_ROWS = 0, as inductor decides."""
    from types import SimpleNamespace

    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    import vaops.models.transformer as tm

    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda features, *args, **kwargs: "inductor's choice"))
    handler = tm._whole_row_choices()

    def choice(hint, numel):
        features = SimpleNamespace(get_reduction_hint=lambda: hint, reduction_numel=numel)
        return handler.should_use_persistent_reduction(features, False)

    sizes = SimpleNamespace(sizevars=SimpleNamespace(statically_known_leq=lambda a, b: a <= b))
    with V.set_graph_handler(sizes):
        before = tm.WHOLE_ROW_CALLS[0]
        assert choice(ReductionHint.INNER, 3072) is True
        assert choice(ReductionHint.INNER, 4096) is True
        assert tm.WHOLE_ROW_CALLS[0] == before + 2
        assert choice(ReductionHint.INNER, 14336) == "inductor's choice"  # the FFN's rows: models/fp8_gelu.py
        assert choice(ReductionHint.OUTER, 3072) == "inductor's choice"
        monkeypatch.setattr(tm, "WHOLE_ROWS", 0)
        assert choice(ReductionHint.INNER, 3072) == "inductor's choice"
