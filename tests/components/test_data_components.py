"""The data stages' Kubeflow components compile, run their stage, and chain by artifact type."""

from __future__ import annotations

import importlib

import pytest
import yaml

from vaops.components.images import CPU_IMAGE, GPU_IMAGE

# stage -> (image, input artifacts, output artifacts)
COMPONENTS = {
    "demos": (CPU_IMAGE, set(), {"dataset"}),
    "ingest": (CPU_IMAGE, set(), {"dataset"}),
    "validate": (CPU_IMAGE, {"dataset"}, {"report", "summary", "metrics"}),
    "clean": (CPU_IMAGE, {"dataset", "validation_report"}, {"cleaned", "report", "summary"}),
    "augment": (CPU_IMAGE, {"dataset"}, {"augmented", "report", "summary"}),
    "encode": (GPU_IMAGE, {"dataset", "base_checkpoint"}, {"encoded", "report", "metrics"}),
}


@pytest.mark.parametrize("stage", sorted(COMPONENTS))
def test_component_compiles_and_calls_its_stage(stage, tmp_path):
    from kfp import compiler

    component = getattr(importlib.import_module(f"vaops.components.{stage}.component"), stage)
    compiler.Compiler().compile(component, str(tmp_path / f"{stage}.yaml"))
    spec = yaml.safe_load((tmp_path / f"{stage}.yaml").read_text())
    image, inputs, outputs = COMPONENTS[stage]
    container = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
    assert container["image"] == image
    assert f"vaops.components.{stage}.stage import run" in container["command"][-1]
    assert "pip install" not in " ".join(container["command"])  # vaops and kfp come with the image
    root = spec["root"]
    assert set(root.get("inputDefinitions", {}).get("artifacts", {})) == inputs
    assert set(root["outputDefinitions"]["artifacts"]) == outputs


@pytest.mark.parametrize("stage", sorted(COMPONENTS))
def test_a_preset_is_not_overridden_by_the_components_own_defaults(stage):
    """A component that takes a preset name must not also declare that preset's fields with defaults of
    its own: they would replace the preset's values on every run (clean's `min_length`/`trim_idle` once
    did, so the "full-length" aloha-full preset still trimmed)."""
    import dataclasses
    import inspect

    component = getattr(importlib.import_module(f"vaops.components.{stage}.component"), stage)
    if "PRESETS[preset]" not in inspect.getsource(component.python_func):
        return  # no stage preset (encode's `preset` names the model's)
    params = inspect.signature(component.python_func).parameters
    presets = importlib.import_module(f"vaops.components.{stage}.config").PRESETS
    fields = {f.name for f in dataclasses.fields(next(iter(presets.values())))}
    shadowing = [name for name, p in params.items()
                 if name in fields and p.default not in (inspect.Parameter.empty, None, -1)]  # -1: "the preset's"
    assert not shadowing, f"{stage} component re-declares preset fields {shadowing}"
