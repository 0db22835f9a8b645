"""Kubeflow wrapper of the deploy stage: the InferenceService manifest as an artifact."""

from kfp import dsl

from vaops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy(model_uri: str, manifest: dsl.Output[dsl.Artifact], storage_uri: str = "",
           image: str = "", gpus: int = 1, namespace: str = "default",
           tracking_uri: str = "") -> str:
    """Writes the validated InferenceService YAML for `model_uri` (models:/name@alias); returns the
    checkpoint URI the cluster will fetch. `image` defaults to the project's CUDA image."""
    import os
    from pathlib import Path

    from vaops.components.deploy.deploy import DeployConfig, run, service_name
    from vaops.components.deploy.manifest import ManifestSpec
    from vaops.components.images import GPU_IMAGE
    from vaops.models.model_source import parse_model_uri

    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    spec = ManifestSpec(name=service_name(parse_model_uri(model_uri)[0]), storage_uri="", model_uri="",
                        namespace=namespace, image=image or GPU_IMAGE, gpus=gpus)
    result = run(DeployConfig(model=model_uri, output=Path(manifest.path), manifest=spec,
                              storage_uri=storage_uri or None))
    manifest.metadata.update({"version": result.version, "warnings": result.warnings})
    return result.storage_uri
