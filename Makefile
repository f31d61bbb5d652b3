# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment .venv here if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpae-installed
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= reports/demo

.PHONY: install test demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The parity tests run a second time on AVX2 kernels, so a CPU dependence shows up here, not on a user's machine.
test: $(STAMP)
	$(PY) -m pytest -q tests
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q tests/test_reference_parity.py

demo: $(STAMP)
	$(PY) -m mpae_lightning.demo --config configs/demo.yaml --out $(DEMO_OUT)

clean:
	rm -rf $(VENV) reports lightning_logs
