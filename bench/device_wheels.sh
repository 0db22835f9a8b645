#!/usr/bin/env bash
# Builds the wheel folders that bench/device_env.sh installs on the lab's GPU nodes (Python 3.12,
# torch, transformers, numpy, pandas, pyarrow, grpcio... already there; nothing can be fetched
# there). A call carries at most 64 MiB, so the project's needs are split by role:
#   .whl-data  demos and data stages: the MuJoCo sim, lerobot's writer (PyAV), diffusers (59 MB)
#   .whl-gpu   training, serving and evaluation: deepspeed, mlflow-skinny, kserve, the sim (46 MB)
#   .whl-train training alone: .whl-gpu without the sim and the serving stack (24 MB), so one call can
#              carry a dataset's latents beside it; a later call on the warm node adds .whl-gpu
#   .whl-rdata, .whl-rgpu  .whl-data and .whl-gpu without the sim (49 MB, 36 MB): bench/production_path.py,
#              its data steps in one call, training and serving in the next ones on the warm node
#   .whl-attn  NVIDIA's cudnn-frontend Python package and what its SDPA op loads (cuda-bindings, tvm-ffi;
#              23 MB, not project dependencies): bench/pass_anatomy.py's attention part tries that op beside
#              torch's kernels; carry it with .whl-rgpu (58 MB together)
# dm_control ships 55 MB of locomotion and dog assets the ALOHA scenes never load: they are cut from
# its wheel. The versions are this venv's (constraints.txt resolves them), so both sides agree.
# The shipped policy (checkpoints/small-aloha, 44.5 MB) is tracked, so it travels with every call and
# leaves ~16 MiB of the 64: for a call that carries wheels, move its transformer/ out of the tree
# first and back after (`git status` shows it deleted meanwhile; nothing else needs it on the node).
# usage: bench/device_wheels.sh            (from the repository root; then see bench/device_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/pip freeze --exclude-editable | grep -v -i -E "^(torch|nvidia|triton)" > "$tmp/pins.txt"
platforms=(); for n in 5 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
fetch() {  # fetch DEST PACKAGE...: cp312 wheels, without their dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -c "$tmp/pins.txt" -d "$1" "${@:2}"
}
sim=(mujoco dm_env dm_tree pyopengl glfw gym_aloha gymnasium farama_notifications diffusers importlib_metadata)
rm -rf .whl-data .whl-gpu && mkdir -p .whl-data .whl-gpu
fetch .whl-data "${sim[@]}" av lerobot datasets dill multiprocess deepdiff orderly_set jsonlines draccus \
  mergedeep pyyaml_include toml termcolor markdown_it_py mdurl
fetch .whl-gpu "${sim[@]}" hjson pydantic pydantic_core annotated_types typing_inspection mlflow_skinny \
  databricks_sdk google_auth pyasn1 pyasn1_modules cachetools opentelemetry_api opentelemetry_proto \
  opentelemetry_sdk opentelemetry_semantic_conventions sqlparse python_dotenv gitpython gitdb smmap \
  kserve fastapi starlette uvicorn httptools cloudevents deprecation orjson grpc_interceptor grpcio protobuf \
  kubernetes oauthlib requests_oauthlib websocket_client python_multipart timing_asgi watchfiles websockets \
  pyjwt tzdata pytz cryptography cffi pycparser markdown_it_py mdurl \
  draccus mergedeep pyyaml_include toml typing_inspect mypy_extensions
# deepspeed is a source distribution: its pure-Python wheel, ops left to JIT compilation.
DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl-gpu \
  "deepspeed==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
# dm_control without the assets of the suites the ALOHA scenes do not use.
fetch "$tmp/dmc" dm_control
(cd "$tmp/dmc" && mkdir x && cd x && unzip -q ../dm_control-*.whl \
  && rm -rf dm_control/locomotion/soccer dm_control/locomotion/walkers/assets dm_control/locomotion/arenas/assets \
            dm_control/suite/dog_assets dm_control/mujoco/testing dm_control/blender dm_control/mjcf/test_assets \
            dm_control/suite/all_domains.png dm_control/locomotion/*.png \
  && python3 - <<'EOF'
import csv, glob, os
rec = glob.glob("dm_control-*.dist-info/RECORD")[0]
rows = [r for r in csv.reader(open(rec)) if os.path.exists(r[0]) or r[0] == rec]
csv.writer(open(rec, "w", newline="")).writerows(rows)
EOF
  zip -q -r -9 "$tmp/dm_control.whl" .)
for d in .whl-data .whl-gpu; do cp "$tmp/dm_control.whl" "$d/$(basename "$tmp"/dmc/dm_control-*.whl)"; done
rm -rf .whl-train && mkdir .whl-train
for f in .whl-gpu/*.whl; do
  case $(basename "$f") in
    mujoco-*|dm_*|pyopengl-*|glfw-*|gym_aloha-*|gymnasium-*|farama_*|kserve-*|kubernetes-*|grpc*|cloudevents-*|\
    deprecation-*|oauthlib-*|requests_oauthlib-*|websocket_client-*|timing_asgi-*|watchfiles-*|websockets-*|\
    httptools-*|pyjwt-*) ;;
    *) cp "$f" .whl-train/ ;;
  esac
done
for pair in .whl-data:.whl-rdata .whl-gpu:.whl-rgpu; do
  src=${pair%%:*} dst=${pair##*:}
  rm -rf "$dst" && mkdir "$dst"
  for f in "$src"/*.whl; do
    case $(basename "$f") in mujoco-*|dm_*|pyopengl-*|glfw-*|gym_aloha-*|gymnasium-*|farama_*) ;; *) cp "$f" "$dst/" ;; esac
  done
done
rm -rf .whl-attn && mkdir .whl-attn && fetch .whl-attn nvidia-cudnn-frontend cuda-bindings cuda-pathfinder apache-tvm-ffi
du -sh .whl-data .whl-gpu .whl-train .whl-rdata .whl-rgpu .whl-attn
