# Source on a bare GPU node of the lab's device tool (torch there, nothing else of the project's):
# unpacks the carried EGL loaders (.gl/*.deb) for headless MuJoCo, installs the carried wheels of
# the folder given (bench/device_wheels.sh builds them), and puts the project's packages on the path.
#   source bench/device_env.sh .whl-gpu            (or several folders: .whl-rgpu .whl-attn)
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
# Compiled kernels: a fresh node compiles for about 220 s before a robotwin server is ready (270.9 s against
# 43-50 s for a restart on the same node, whose inductor and Triton caches are on its disk:
# bench/results/serve_load_full_episodes_h200.md). Packed, those caches are 77 MB (486 MB unpacked), over the 16 MiB
# a call can return and the room beside the carried wheels, so each fresh node compiles anew. Served in a
# cluster, `vaops serve --compile-cache` keeps them on a volume instead.
mkdir -p /tmp/site/vaops
for d in models components pipelines serving; do ln -sfn "$PWD/$d" "/tmp/site/vaops/$d"; done
export PYTHONPATH=/tmp/site MUJOCO_GL=egl HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# NVIDIA's EGL vendor file, where the node mounts the driver outside the loader's search path.
nv_egl=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f "$nv_egl" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$nv_egl
true
