"""Where a served checkpoint comes from: a local folder, a shipped policy folder, or a version in the
MLflow model registry.

A shipped policy (`checkpoint.ship_checkpoint`: the transformer and policy.json, small enough to
ship with the code) becomes a complete checkpoint folder in the model cache the first time it is
resolved: its VAE and text encoder are rebuilt from the preset's seed and checked against the
hashes it records.

The registry defaults to SQLite in the working directory (`sqlite:///<cwd>/mlflow.db`, artifacts
in `<cwd>/mlartifacts`) unless MLFLOW_TRACKING_URI says otherwise, so `vaops register` and
`vaops serve --model models:/name@alias` find the same store without any setup.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Inside a registered model's artifacts, the checkpoint folder is logged under this name.
CHECKPOINT_ARTIFACT = "checkpoint"
WEIGHT_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
# Weights are read from safetensors only: a checkpoint that carries pickles is refused outright, so
# no loader can fall back to unpickling them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Marks a shipped policy folder and says how to rebuild what it leaves out (the VAE and text encoder).
SHIPPED_FILE = "shipped.json"
CACHE_ENV = "VAOPS_MODEL_CACHE"
# The policy server's bearer token (`vaops serve`, `vaops deploy --local`) and its clients' (`vaops eval`).
TOKEN_ENV = "VAOPS_SERVE_TOKEN"
_COMPLETE = ".complete"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def tracking_uri() -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Local artifact folder next to a local SQLite store; None for remote stores (server decides)."""
    if uri.startswith("sqlite:///"):
        # sqlite:///relative.db is relative to the working directory, as SQLite opens it
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` or `models:/name/3` -> (name, alias, version)."""
    m = _MODEL_URI.match(uri)
    if not m:
        raise ValueError(f"model URI {uri!r} must be models:/<name>@<alias> or models:/<name>/<version>")
    return m["name"], m["alias"], m["version"]


def is_registry_uri(model: str) -> bool:
    return model.startswith("models:/")


def pickled_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for part in WEIGHT_PARTS if (folder / part).is_dir()
                  for p in (folder / part).rglob("*") if p.suffix in PICKLE_SUFFIXES)


def refuse_pickles(folder: Path) -> Path:
    found = pickled_files(folder)
    if found:
        raise ValueError(f"{folder}: pickled weights {found} are refused; save the weights as safetensors")
    return folder


def find_checkpoint(model_dir: Path) -> Path:
    """The checkpoint folder inside a downloaded MLflow model (or the folder itself)."""
    for candidate in (model_dir / "artifacts" / CHECKPOINT_ARTIFACT, model_dir / CHECKPOINT_ARTIFACT, model_dir):
        if (candidate / "policy.json").is_file():
            return candidate
    raise FileNotFoundError(f"{model_dir}: no checkpoint (policy.json) in the downloaded model")


def model_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vaops" / "models")


def _cached(target: Path, fill: Callable[[Path], object], note: str) -> Path:
    """`target` in the model cache, made once by `fill(tmp)` in a fresh sibling folder renamed into
    place, and reused by later starts; of concurrent starts, the first to finish wins."""
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        fill(tmp)
        (tmp / _COMPLETE).write_text(note + "\n")
        if target.exists():  # an interrupted earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / _COMPLETE).is_file():  # not a concurrent start that finished first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _content_digest(folder: Path) -> str:
    """sha256 over every file's path and bytes: an edited weight or policy.json is another policy."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _materialized(folder: Path) -> Path:
    """The complete checkpoint folder of a shipped policy, made once in the model cache."""
    from .checkpoint import materialize_shipped

    target = model_cache() / "shipped" / f"{_SAFE.sub('_', folder.absolute().name)}-{_content_digest(folder)[:16]}"
    cached = _cached(target, lambda tmp: materialize_shipped(folder, tmp / CHECKPOINT_ARTIFACT),
                     f"{folder.absolute()} materialized")
    return find_checkpoint(cached)


def resolve_checkpoint(model: str) -> Path:
    """A local checkpoint folder for `model`. A shipped policy folder is materialized, and a
    registry version downloaded, once into the model cache (`$VAOPS_MODEL_CACHE`, default
    ~/.cache/vaops/models) and reused by later starts."""
    if not is_registry_uri(model):
        folder = Path(model)
        if (folder / SHIPPED_FILE).is_file():
            return refuse_pickles(_materialized(folder))
        if not (folder / "policy.json").is_file():
            raise FileNotFoundError(f"{folder}: not a checkpoint folder (policy.json is missing)")
        return refuse_pickles(folder)
    name, alias, version = parse_model_uri(model)
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    try:
        client = MlflowClient(uri)
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as e:
        raise FileNotFoundError(f"{model}: not in the model registry at {uri}: {e.message}") from None
    # The logged model's id tells two registries' "version 1" apart.
    identity = getattr(mv, "model_id", None) or mv.run_id or "local"
    target = model_cache() / _SAFE.sub("_", name) / f"{mv.version}-{_SAFE.sub('_', identity)}"

    def download(tmp: Path) -> None:
        mlflow.set_tracking_uri(uri)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(tmp))

    return refuse_pickles(find_checkpoint(_cached(target, download, f"{model} -> models:/{name}/{mv.version}")))
