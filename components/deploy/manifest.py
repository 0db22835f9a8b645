"""The KServe InferenceService that serves a registered policy, generated and checked.

Shape of what is generated (serving.kserve.io/v1beta1):
- Standard deployment mode (a plain Deployment + Service; no Knative, so websockets and long
  chunk requests are not cut by an activator);
- one custom container running `vaops serve --model /mnt/models` on 0.0.0.0:8080 (REST,
  websocket, metrics) and 8081 (gRPC); KServe's storage initializer downloads `STORAGE_URI`
  (the registered version's checkpoint artifact) to /mnt/models first;
- GPU resources, a startup probe on model readiness (loading 5 B parameters takes minutes),
  readiness and liveness probes, Prometheus scraping annotations;
- a volume for compiled kernels (`vaops serve --compile-cache`): an emptyDir, which a container restarted in
  its pod keeps, or a PersistentVolumeClaim, which a new pod keeps too (a fresh start compiles for minutes);
- SIGTERM drains (`vaops serve --drain-timeout`): the episodes under way finish, no new one starts; the pod's
  termination grace period outlasts the drain, so Kubernetes does not kill robots' episodes mid-way;
- exactly one replica. KServe routes requests without session affinity, and an episode's KV
  cache lives in one replica's memory, so a second replica would receive chunks of sessions it
  does not hold. Scale by running one InferenceService per GPU, not by replicas.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from kserve.models import V1beta1InferenceServiceSpec, V1beta1PredictorSpec

from vaops.components.images import GPU_IMAGE
from vaops.models.model_source import TOKEN_ENV

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
HTTP_PORT = 8080
GRPC_PORT = 8081
MODEL_MOUNT = "/mnt/models"
# Seconds between the end of a drain and Kubernetes' SIGKILL: the server's shutdown after its drain.
DRAIN_MARGIN_S = 30
COMPILE_CACHE_MOUNT = "/var/cache/vaops"  # vaops serve --compile-cache
COMPILE_CACHE_VOLUME = "compile-cache"
CONTAINER_NAME = "kserve-container"  # the name KServe's storage initializer and probes expect
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
AFFINITY_NOTE = ("none: KServe routes without session affinity and each episode's KV cache lives in one "
                 "replica, so minReplicas = maxReplicas = 1")
# Annotations that have Prometheus (and KServe's aggregation) scrape the server's /metrics.
SCRAPING = {"serving.kserve.io/enable-prometheus-scraping": "true", "prometheus.io/scrape": "true",
            "prometheus.io/port": str(HTTP_PORT), "prometheus.io/path": "/metrics"}
# URI schemes KServe's storage initializer can fetch inside a cluster.
CLUSTER_SCHEMES = ("s3", "gs", "pvc", "hdfs", "webhdfs", "http", "https", "hf", "oci")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1123_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class ManifestSpec:
    # `vaops deploy`'s flags (through the config codec) but the URIs and timeouts it fills in
    name: str = field(metadata={"help": "InferenceService name (default: the registered model name)"})
    storage_uri: str = field(metadata={"flag": None})
    model_uri: str = field(metadata={"flag": None})  # the registry reference it was made from, an annotation
    namespace: str = "default"
    image: str = field(default=GPU_IMAGE, metadata={"help": "serving image (docker/ builds it)"})  # runs `vaops serve`
    gpus: int = 1
    cpu: str = "8"
    memory: str = "64Gi"
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    max_sessions: int = 8
    fp8: bool = field(default=False, metadata={"help": "FP8 block GEMMs (vaops serve --fp8: a Hopper GPU, bfloat16)"})
    warm_sessions: int = field(default=1, metadata={"help": "sessions warmed up before ready (vaops serve "
                                                            "--warm-sessions; about 35 s each on an H200)"})
    idle_timeout_s: float = field(default=600.0, metadata={"flag": None})
    token_secret: str | None = field(default=None, metadata={  # a Secret with key "token"
        "help": "Kubernetes Secret (key 'token') that enables bearer authentication"})
    startup_timeout_s: int = field(default=1800, metadata={"flag": None})
    drain_timeout_s: float = field(default=120.0, metadata={
        "flag": "drain_timeout", "help": "on the pod's stop, the longest wait for the episodes under way (vaops serve "
                                         "--drain-timeout; the termination grace period is 30 s more)"})
    compile_cache_pvc: str | None = field(default=None, metadata={
        "help": "PersistentVolumeClaim for compiled kernels, kept across pods (default: an emptyDir, kept across "
                "the container's restarts in its pod)"})


def serving_options(spec: ManifestSpec) -> list[str]:
    """`vaops serve`'s flags for the spec's FP8 and warm-up choices (none at their defaults)."""
    return (["--fp8"] if spec.fp8 else []) + (["--warm-sessions", str(spec.warm_sessions)] if spec.warm_sessions > 1
                                              else [])


def compile_cache_volume(spec: ManifestSpec) -> dict:
    source = ({"persistentVolumeClaim": {"claimName": spec.compile_cache_pvc}} if spec.compile_cache_pvc
              else {"emptyDir": {}})
    return {"name": COMPILE_CACHE_VOLUME, **source}


def build_manifest(spec: ManifestSpec) -> dict:
    def ready() -> dict:  # a fresh dict per probe, so the YAML has no anchors
        return {"httpGet": {"path": f"/v2/models/{spec.name}/ready", "port": HTTP_PORT}}
    args = ["serve", "--model", MODEL_MOUNT, "--name", spec.name, "--host", "0.0.0.0",
            "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT),
            "--device", "cuda" if spec.gpus > 0 else "cpu", "--dtype", spec.dtype,
            "--max-sessions", str(spec.max_sessions), "--idle-timeout", f"{spec.idle_timeout_s:g}",
            "--compile-cache", COMPILE_CACHE_MOUNT, "--drain-timeout", f"{spec.drain_timeout_s:g}",
            *serving_options(spec)]
    env: list[dict[str, object]] = [{"name": "STORAGE_URI", "value": spec.storage_uri},
                                    {"name": "HF_HUB_OFFLINE", "value": "1"}]
    if spec.token_secret:
        env.append({"name": TOKEN_ENV,
                    "valueFrom": {"secretKeyRef": {"name": spec.token_secret, "key": "token"}}})
    resources = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus > 0:
        resources["nvidia.com/gpu"] = str(spec.gpus)
    period = 10
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": ["vaops"],
        "args": args,
        "env": env,
        "ports": [{"containerPort": HTTP_PORT, "name": "http1", "protocol": "TCP"}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": [{"name": COMPILE_CACHE_VOLUME, "mountPath": COMPILE_CACHE_MOUNT}],
        "startupProbe": {**ready(), "periodSeconds": period, "failureThreshold": max(1, spec.startup_timeout_s // period)},
        "readinessProbe": {**ready(), "periodSeconds": period},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": HTTP_PORT}, "periodSeconds": 30},
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/part-of": "vaops"},
            "annotations": {
                DEPLOYMENT_MODE: "Standard",
                **SCRAPING,
                "vaops/session-affinity": AFFINITY_NOTE,
                "vaops/model-uri": spec.model_uri,
            },
        },
        "spec": {"predictor": {"minReplicas": 1, "maxReplicas": 1, "containers": [container],
                               "volumes": [compile_cache_volume(spec)],
                               "terminationGracePeriodSeconds": math.ceil(spec.drain_timeout_s) + DRAIN_MARGIN_S}},
    }


def _flag_value(args: list, flag: str) -> str | None:
    """The value after `flag` in the container's args; None where the flag is absent or last."""
    i = args.index(flag) + 1 if flag in args else len(args)
    return str(args[i]) if i < len(args) else None


def _unknown_keys(raw: dict, attribute_map: dict, where: str) -> list[str]:
    known = set(attribute_map.values())
    return [f"{where}: unknown field {k!r}" for k in raw if k not in known]


def _k8s_problems(obj: dict, kind: str, path: str) -> list[str]:
    """Round-trip `obj` through the Kubernetes client's model `kind` (V1Container, V1Volume): fields it drops are
    misspelled or misplaced."""
    from kubernetes.client import ApiClient

    class _Response:
        data = json.dumps(obj)

    client = ApiClient()
    back = client.sanitize_for_serialization(client.deserialize(_Response(), kind))
    problems = []

    def compare(a, b, path):
        if isinstance(a, dict):
            for k, v in a.items():
                if not isinstance(b, dict) or k not in b:
                    problems.append(f"{path}.{k}: not a Kubernetes {kind[2:].lower()} field")
                else:
                    compare(v, b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            for i, (x, y) in enumerate(zip(a, b)):
                compare(x, y, f"{path}[{i}]")

    compare(obj, back, path)
    return problems


def validate_manifest(doc: dict) -> tuple[list[str], list[str]]:
    """(errors, warnings) of an InferenceService manifest as `build_manifest` makes it."""
    errors: list[str] = []
    warnings: list[str] = []
    if not isinstance(doc, dict):
        return [f"manifest must be a mapping, got {type(doc).__name__}"], warnings
    if doc.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        errors.append(f"kind must be {KIND}, got {doc.get('kind')!r}")
    meta = doc.get("metadata") or {}
    name = meta.get("name", "")
    if not _DNS_1035.match(str(name)):
        errors.append(f"metadata.name {name!r} must be a DNS-1035 label (lowercase letters, digits, '-')")
    if not _DNS_1123.match(str(meta.get("namespace", ""))):
        errors.append(f"metadata.namespace {meta.get('namespace')!r} must be a DNS-1123 label")
    ann = meta.get("annotations") or {}
    if ann.get(DEPLOYMENT_MODE) != "Standard":
        errors.append(f"annotation {DEPLOYMENT_MODE} must be Standard, got {ann.get(DEPLOYMENT_MODE)!r}")
    for key, want in SCRAPING.items():
        if ann.get(key) != want:
            errors.append(f"annotation {key} must be {want!r}, got {ann.get(key)!r}")
    spec = doc.get("spec") or {}
    errors += _unknown_keys(spec, V1beta1InferenceServiceSpec.attribute_map, "spec")
    pred = spec.get("predictor")
    if not isinstance(pred, dict):
        return errors + ["spec.predictor is missing"], warnings
    errors += _unknown_keys(pred, V1beta1PredictorSpec.attribute_map, "spec.predictor")
    if pred.get("minReplicas") != 1 or pred.get("maxReplicas") != 1:
        errors.append(f"spec.predictor must pin one replica (sessions live in one replica's memory), got "
                      f"minReplicas={pred.get('minReplicas')} maxReplicas={pred.get('maxReplicas')}")
    containers = pred.get("containers") or []
    if len(containers) != 1:
        return errors + [f"spec.predictor.containers must hold one container, got {len(containers)}"], warnings
    c = containers[0]
    errors += _k8s_problems(c, "V1Container", "container")
    for i, volume in enumerate(pred.get("volumes") or []):
        errors += _k8s_problems(volume, "V1Volume", f"spec.predictor.volumes[{i}]")
    if c.get("name") != CONTAINER_NAME:
        errors.append(f"container name must be {CONTAINER_NAME!r}, got {c.get('name')!r}")
    if not c.get("image"):
        errors.append("container image is empty")
    args = c.get("args") or []
    if args[:3] != ["serve", "--model", MODEL_MOUNT]:
        errors.append(f"container args must start with serve --model {MODEL_MOUNT}, got {args[:3]}")
    env = {e.get("name"): e for e in c.get("env") or []}
    storage = (env.get("STORAGE_URI") or {}).get("value")
    if not storage:
        errors.append("container env STORAGE_URI (the checkpoint to download) is missing")
    else:
        scheme = urlparse(storage).scheme
        if scheme not in CLUSTER_SCHEMES:
            warnings.append(f"STORAGE_URI {storage} is not fetchable from a cluster (scheme {scheme or 'none'!r}); "
                            f"use an s3/gs/pvc artifact store or pass --storage-uri")
    limits = (c.get("resources") or {}).get("limits") or {}
    cuda = _flag_value(args, "--device") == "cuda"
    if cuda and not limits.get("nvidia.com/gpu"):
        errors.append("a cuda container needs resources.limits nvidia.com/gpu")
    if "--fp8" in args and not (cuda and _flag_value(args, "--dtype") == "bfloat16"):
        errors.append("--fp8 needs a cuda container serving --dtype bfloat16")
    if "--compile-cache" in args:
        cache = _flag_value(args, "--compile-cache")
        mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts") or []}
        volumes = {v.get("name"): v for v in pred.get("volumes") or []}
        if mounts.get(cache) not in volumes:
            errors.append(f"--compile-cache {cache} needs a volume mounted there (else the compiled kernels are lost "
                          f"with the container)")
        claim = (volumes.get(mounts.get(cache)) or {}).get("persistentVolumeClaim") or {}
        if claim and not _DNS_1123_SUBDOMAIN.match(str(claim.get("claimName", ""))):
            errors.append(f"persistentVolumeClaim claimName {claim.get('claimName')!r} must be a DNS-1123 subdomain")
    if "--drain-timeout" in args:
        drain = _flag_value(args, "--drain-timeout") or "?"
        grace = pred.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        if not re.fullmatch(r"\d+(\.\d+)?", drain) or not isinstance(grace, int) or grace <= float(drain):
            errors.append(f"terminationGracePeriodSeconds {grace} must exceed --drain-timeout {drain} (else Kubernetes "
                          f"kills the episodes the server lets finish)")
    probe = (c.get("startupProbe") or {}).get("httpGet") or {}
    if probe.get("path") != f"/v2/models/{name}/ready" or probe.get("port") != HTTP_PORT:
        errors.append(f"startupProbe must GET /v2/models/{name}/ready on port {HTTP_PORT}, got {probe}")
    ports = [p.get("containerPort") for p in c.get("ports") or []]
    if ports != [HTTP_PORT]:
        errors.append(f"container must expose port {HTTP_PORT} (REST, websocket, metrics), got {ports}")
    return errors, warnings
