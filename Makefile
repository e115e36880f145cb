# facecap developer commands. On a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup chromium demo test test-fast test-stress fuzz lint eval bench bench-download clean

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

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The download stage's fuzz test at a larger size: FUZZ_CASES mutated files (default 30000, split
# over jpg, png and webp output), FUZZ_SEED to vary them. The normal suite runs 3000.
fuzz: $(STAMP)
	FUZZ_CASES=$${FUZZ_CASES:-30000} $(BIN)/python -m pytest -q -p no:warnings tests/stages/download/test_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check app pipeline stages tests bench setup.py
	$(BIN)/ruff format --check app pipeline stages tests bench setup.py

bench: bench-ingest bench-download bench-detect bench-quality bench-tag bench-caption bench-recaption bench-dedup bench-tarwriter bench-soak

# Accuracy of each available detector on ../shared/data/faces (or FACECAP_SHARED).
eval: $(STAMP)
	$(BIN)/python bench/eval_detect.py
	$(BIN)/python bench/eval_quality.py
	$(BIN)/python bench/eval_tag.py

# bench-detect, bench-dedup, bench-caption, bench-tag, bench-quality, bench-ingest, bench-soak, bench-scale,
# bench-recaption, bench-tarwriter: each runs bench/bench_<name>.py (figures in docs/performance.md; the
# last two in docs/captioning.md and docs/export.md). bench-soak runs every stage end to end
# on a loopback corpus (SOAK_URLS, default 50000), memory sampled; SOAK_WORKERS=1,2,4,8,16 repeats it
# per worker count and prints the scaling efficiency. bench-scale writes synthetic datasets of
# SCALE_SIZES rows (default 100000,300000,1000000; bench/scale_data.py) and measures export, report,
# stats and dedup's decision on them: time, driver and largest-child peak RSS, growth exponents
# (not in `make bench`: at 1M rows, 1.8 GB of data and 5.5 GB of export on disk, removed after, and
# tens of minutes; SCALE_STEPS picks steps, e.g. "stats,report,dedup").
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
	rm -rf $(VENV) demo-out bench-out .pytest_cache .ruff_cache
