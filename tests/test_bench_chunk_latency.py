"""bench/chunk_latency.py's floor of a chunk: it counts the denoising passes a steady synchronous chunk runs
(rows and tokens of each) as the engine runs them, at every operating point, and its arithmetic orders
the points and precisions as the hardware would. Its accuracy rows: one per operating point."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from chunk_latency import (accuracy_vs_fp32, baseline, baseline_parts, chunk_floor, chunk_passes,  # noqa: E402
                           compare_actions, observation, run_chunks)

from vaops.models.config import get_preset  # noqa: E402
from vaops.models.engine import EngineConfig, InferenceEngine  # noqa: E402
from vaops.models.transformer import build_transformer  # noqa: E402


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    preset = get_preset("tiny")
    model = build_transformer(preset.transformer, seed=0, device="cpu", dtype=torch.float32)
    return InferenceEngine(model, EngineConfig.from_preset(preset))


def recorded_passes(engine: InferenceEngine) -> Counter:
    """(rows, tokens) of every pass one synchronous act + observe runs, once the cache is full."""
    passes: Counter = Counter()
    forward = engine._forward

    def counting(kind, x, t, keep, predicted, cond_only):
        _, f, h, w = engine._pass(kind, x)
        passes[(1 if cond_only else engine.batch, f * h * w)] += 1
        return forward(kind, x, t, keep, predicted, cond_only)

    gen = torch.Generator().manual_seed(1)
    obs = observation(engine, gen)
    engine._forward = counting  # type: ignore[method-assign]
    try:
        engine.act(generator=gen)
        engine.observe(*obs)
    finally:
        del engine._forward
    return passes


@pytest.mark.parametrize("point", ["released", "paper", "fast"])
def test_the_floor_counts_the_passes_a_chunk_runs(engine, point):
    preset = get_preset("tiny")
    engine.set_sampling(preset.operating_point(point))
    run_chunks(engine, 1, preset.sampling.attn_window // 2 + 1, text_len=8, seed=0)  # a full cache
    assert engine.cache is not None and engine.cache.full
    assert recorded_passes(engine) == Counter((rows, tokens) for _, rows, tokens in chunk_passes(engine))


def test_the_floor_grows_with_the_passes_and_shrinks_with_fp8(engine):
    preset = get_preset("tiny")
    floors, passes = {}, {}
    for point in ("released", "paper", "fast"):
        engine.set_sampling(preset.operating_point(point))
        run_chunks(engine, 1, preset.sampling.attn_window // 2 + 1, text_len=8, seed=0)
        passes[point] = len(chunk_passes(engine))
        for precision in ("bf16", "fp8"):
            f = chunk_floor(engine, text_len=8, precision=precision, bandwidth=4.2e12)
            parts = f["video passes_floor_s"] + f["action passes_floor_s"] + f["observation_floor_s"]
            assert f["floor_s"] == pytest.approx(parts)
            floors[point, precision] = f["floor_s"]
        # The tiny model's passes are bound by reading its weights: FP8 reads them in half the bytes.
        assert floors[point, "fp8"] < floors[point, "bf16"]
    by_passes = sorted(passes, key=passes.get)
    assert len(set(passes.values())) == 3
    assert [floors[p, "bf16"] for p in by_passes] == sorted(floors[p, "bf16"] for p in by_passes)


def test_accuracy_rows_cover_every_operating_point_and_differ_from_fp32_a_little():
    preset = get_preset("tiny")
    acc = accuracy_vs_fp32(preset, torch.device("cpu"), seed=0, text_len=8, fp8=False)
    assert set(acc) == {"bf16"} and set(acc["bf16"]) == set(preset.operating_point_settings())
    for point, a in acc["bf16"].items():
        assert 0 < a["actions_rel_l2"] < 0.05 and 0 < a["video_rel_l2"] < 0.05, point  # bf16 rounding only


def test_baselines_switch_the_served_path_back_and_restore_it():
    """`--baselines` names: unknown ones are refused by name; inside the context each change is switched
    off, and everything is as before after it, even when the body raises."""
    import vaops.models.fp8 as fp8
    import vaops.models.transformer as transformer
    from vaops.models.kv_cache import CachedSelfAttention

    assert baseline_parts("kv-copies+fast-accum") == {"kv-copies", "fast-accum"} and baseline_parts("") == set()
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        baseline_parts("nope+kv-copies")
    destination = CachedSelfAttention.destination
    graph_cache = torch._inductor.config.fx_graph_cache
    with pytest.raises(RuntimeError):
        with baseline("kv-copies+inductor-gelu+split-regions+fast-accum+looped-rows"):
            assert CachedSelfAttention.destination is not destination
            assert not (fp8.FUSED_GELU or transformer.CHAIN_REGIONS or fp8.FAST_ACCUM or transformer.WHOLE_ROWS)
            assert torch._inductor.config.fx_graph_cache is False  # so the regions really recompile
            raise RuntimeError
    assert CachedSelfAttention.destination is destination
    assert fp8.FUSED_GELU and transformer.CHAIN_REGIONS and fp8.FAST_ACCUM and transformer.WHOLE_ROWS == 4096
    assert torch._inductor.config.fx_graph_cache == graph_cache


def test_each_baseline_episode_is_compared_with_the_served_one_on_the_same_inputs():
    """compare_actions: a baseline row gets the relative L2 distance of its episode's actions from the served row's of
    the same precision, backend and point (0 where they agree), and no row keeps its actions (they are not JSON)."""
    served = torch.ones(3, 1, 30, 2, 16, 1)
    rows = [{"precision": "fp8", "backend": "splitkv", "operating_point": "paper", "baseline": None, "_actions": served},
            {"precision": "fp8", "backend": "splitkv", "operating_point": "paper", "baseline": "kv-copies",
             "_actions": served.clone()},
            {"precision": "fp8", "backend": "splitkv", "operating_point": "paper", "baseline": "fast-accum",
             "_actions": served * 1.01},
            {"precision": "bf16", "backend": "splitkv", "operating_point": "paper", "baseline": "fast-accum",
             "_actions": served}]  # no served bf16 row to compare with
    compare_actions(rows)
    assert rows[1]["actions_rel_l2_vs_served"] == 0
    assert rows[2]["actions_rel_l2_vs_served"] == pytest.approx(0.01, rel=1e-4)
    assert "actions_rel_l2_vs_served" not in rows[0] and "actions_rel_l2_vs_served" not in rows[3]
    assert not any("_actions" in row for row in rows)
