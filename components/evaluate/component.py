"""Kubeflow component of `vaops eval` (lightweight Python component).

Either evaluates a running policy server (`policy_url`, e.g. a deployed InferenceService) or
serves the `checkpoint` artifact inside the step. Outputs: the whole evaluation folder, its
metrics (Kubeflow's metrics view), the self-contained HTML report; returns the success rate.
Several shards (`shard` i/n, e.g. under a ParallelFor) each write their episodes; `merge` then
makes the report from all of them.
"""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(results: dsl.Output[dsl.Artifact], metrics: dsl.Output[dsl.Metrics], report: dsl.Output[dsl.HTML],
             checkpoint: dsl.Input[dsl.Model] = None, policy_url: str = "", preset: str = "aloha",
             episodes: int = 0, max_steps: int = 0, robotwin_root: str = "", shard: str = "0/1",
             device: str = "cpu", model_run_id: str = "", tracking_uri: str = "") -> float:
    import os
    from pathlib import Path

    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from vaops.components.evaluate.config import (
        ClientConfig,
        Shard,
        TrackingConfig,
        get_eval_preset,
    )
    from vaops.components.evaluate.local_server import LocalPolicyServer
    from vaops.components.evaluate.outputs import publish
    from vaops.components.evaluate.run import run
    from vaops.components.step_outputs import save_metrics

    if bool(policy_url) == (checkpoint is not None):
        raise ValueError("give exactly one of policy_url (a running server) and checkpoint (served in this step)")
    if not model_run_id and checkpoint is not None:  # the train step records its MLflow run on the checkpoint
        model_run_id = checkpoint.metadata.get("mlflow_run_id", "")
    config = get_eval_preset(preset, results.path, episodes=episodes or None, max_steps=max_steps or None,
                             robotwin_root=robotwin_root or None, shard=Shard.parse(shard),
                             tracking=TrackingConfig(model_run_id=model_run_id or None))
    if checkpoint is not None:
        with LocalPolicyServer(checkpoint.path, config.shard_dir() / "policy_server.log", device) as server:
            result = run(config.replace(client=ClientConfig(url=server.url)))
    else:
        result = run(config.replace(client=ClientConfig(url=policy_url)))
    if result.metrics is None:  # one shard of several: the merge step reports
        metrics.log_metric("episodes", len(result.records))
        metrics.log_metric("successes", sum(r.success for r in result.records))
        save_metrics(metrics)
        Path(report.path).write_text(f"<p>Shard {shard}: {len(result.records)} episode(s); the merge step reports.</p>")
        return -1.0
    return publish(result, metrics, report.path, results, suite=config.suite)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge(shards: dsl.Input[list[dsl.Artifact]], results: dsl.Output[dsl.Artifact], metrics: dsl.Output[dsl.Metrics],
          report: dsl.Output[dsl.HTML], model_run_id: str = "", tracking_uri: str = "") -> float:
    """The evaluation of all shards' `results` folders: metrics, report and MLflow run, as a
    single-shard evaluation makes them; returns the success rate."""
    import os
    import shutil
    from pathlib import Path

    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from vaops.components.evaluate.config import TrackingConfig
    from vaops.components.evaluate.outputs import publish
    from vaops.components.evaluate.run import merge_and_report

    out = Path(results.path)
    for shard in shards:
        for folder in sorted((Path(shard.path) / "shards").iterdir()):
            shutil.copytree(folder, out / "shards" / folder.name)  # episode videos keep their relative paths
    result = merge_and_report(out, TrackingConfig(model_run_id=model_run_id or None))
    return publish(result, metrics, report.path, results, shards=len(shards))
