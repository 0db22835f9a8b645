# Source on a bare GPU node of the lab's device tool (torch there, nothing else of the project's):
# unpacks the carried EGL loaders (.gl/*.deb) for headless MuJoCo, installs the carried wheels of
# the folder given (bench/device_wheels.sh builds them), and puts the project's packages on the path.
#   source bench/device_env.sh .whl-gpu            (or several folders: .whl-rgpu .whl-attn)
# carrying .compile-cache too where an earlier call packed its kernels (pack_kernels, below).
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
# A node kept warm between calls keeps /tmp/site: install once per wheel folder (one or more folders).
for wheels in "$@"; do
  stamp=/tmp/site/.installed-$(basename "$wheels")
  if [ ! -f "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheels"/*.whl || return 1
    touch "$stamp"
  fi
done
# Compiled kernels (inductor's and Triton's caches) in one folder: a fresh node compiles for minutes before a
# robotwin server is ready (255 s against 56 s on a node that had compiled, bench/results/
# serve_load_batched_default_h200.md). A call that ends with `pack_kernels $OUT` (below) brings them
# back as kernels.tar.gz; put that in .compile-cache/ and carry it, and a fresh node starts from them.
export TORCHINDUCTOR_CACHE_DIR=/tmp/compile-cache/inductor TRITON_CACHE_DIR=/tmp/compile-cache/triton
if [ -f .compile-cache/kernels.tar.gz ] && [ ! -d /tmp/compile-cache ]; then
  mkdir -p /tmp/compile-cache && tar -xzf .compile-cache/kernels.tar.gz -C /tmp/compile-cache
fi
pack_kernels() {  # pack_kernels DIR: the compiled kernels as DIR/kernels.tar.gz (a returned file holds 16 MiB)
  tar -czf "$1/kernels.tar.gz" -C /tmp/compile-cache . && du -h "$1/kernels.tar.gz"
}
mkdir -p /tmp/site/vaops
for d in models components pipelines serving; do ln -sfn "$PWD/$d" "/tmp/site/vaops/$d"; done
export PYTHONPATH=/tmp/site MUJOCO_GL=egl HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# NVIDIA's EGL vendor file, where the node mounts the driver outside the loader's search path.
nv_egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f "$nv_egl" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$nv_egl
true
