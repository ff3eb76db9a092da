# Two commands do all the set-up, each the first command typed on a fresh clone:
#   make demo   the main job: train a ResNet-18 on digits, compress it, fine-tune it (offline)
#   make test   the test suite (what CI runs)
# Both create .venv if missing and install what they need into it: the pinned torch first (its
# wheels lie on the CI machines' disk; an unpinned torch would pull a multi-GB build), then tdnn.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: demo test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -m pip install -q $(TORCH)
	touch $@

$(VENV)/.examples: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[examples]"
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.examples
	$(PY) examples/compress_resnet.py

test: $(VENV)/.test
	$(PY) -m pytest -q -n auto --dist loadgroup --doctest-modules tdnn tests
