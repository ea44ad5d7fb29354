# Two commands on a fresh machine:
#   make demo   set up, then fit/test/export each task's main built-in config and write the leaderboard
#               (make demo TASKS="low_light scene_classification" runs a subset;
#                make demo-all adds every comparison config: ablations, baselines, other backbones)
#   make test   set up, then run the test suite
# Set-up is idempotent: it reinstalls only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup browser demo demo-all test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# open3d's import needs libusb; install it from Debian when it is missing (needs root or sudo).
	@if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0; then \
		echo "installing libusb-1.0-0 (needed by open3d)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q libusb-1.0-0 >/dev/null; } || \
		echo "warning: could not install libusb-1.0-0; open3d will not import"; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The exact torch pair first: a bare torch requirement could pull a different multi-GB build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import torch, pytorch_lightning, timm, open3d, onnxruntime, albumentations; print('set-up complete: torch', torch.__version__)"
	touch $@

demo: setup
	$(PY) lightning_app.py demo $(if $(TASKS),--tasks $(TASKS))

demo-all: setup
	$(PY) lightning_app.py demo --all $(if $(TASKS),--tasks $(TASKS))

# The report test opens the HTML leaderboard in headless Chromium (Debian's package).
browser:
	@if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then \
		echo "installing chromium (the HTML report test opens the page in it)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; } || \
		echo "warning: could not install chromium; the report test will fail"; \
	fi

test: setup browser
	$(PY) -m pytest

clean:
	rm -rf runs
