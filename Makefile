# The front door: every target creates .venv when needed and installs what it needs (pinned).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# --no-compile: a module is byte-compiled when first imported, not all of torch at install (~25 s of CPU)
INSTALL := $(PY) -m pip --disable-pip-version-check install --no-compile
# ... and that needs bytecode to be written: with PYTHONDONTWRITEBYTECODE set (as on the CI image),
# every process that imports peft compiles torch, transformers and peft again (import peft: 21 s
# of CPU instead of 9 s), and `make test` starts dozens of them.
unexport PYTHONDONTWRITEBYTECODE
RUST_SOURCES := $(wildcard rust/*.rs) Cargo.toml Cargo.lock pyproject.toml
EXTENSION_STAMP := $(VENV)/.fastkeys-built

.DEFAULT_GOAL := help
.PHONY: help install build check format test test-parts compat-slice-fetched test-rust test-native test-python test-wheels test-compat test-compat-slice wheels fuzz demo docs lint lint-rust lint-python bench bench-adapters bench-lifecycle bench-methods bench-scale bench-width clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "fastkeys needs Python >= 3.10"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.dev-installed: requirements/dev.txt | $(BIN)/activate
	$(INSTALL) -q -r requirements/dev.txt
	touch $@

$(VENV)/.bench-installed: requirements/bench.txt | $(VENV)/.dev-installed
	$(INSTALL) -q -r requirements/bench.txt
	touch $@

$(VENV)/.peft-installed: requirements/peft.txt | $(VENV)/.dev-installed
	$(INSTALL) -q $$(grep -E '^torch==' requirements/peft.txt)
	$(INSTALL) -q -r requirements/peft.txt
	touch $@

install: $(VENV)/.dev-installed $(VENV)/.peft-installed ## Create .venv with every pinned tool and library

$(EXTENSION_STAMP): $(RUST_SOURCES) | $(VENV)/.dev-installed
	$(BIN)/maturin develop --release --quiet
	touch $@

build: $(EXTENSION_STAMP) ## Build the Rust extension into .venv (release mode)

# pytest-xdist workers for the two suites (both cores of the CI machine; WORKERS=0 runs in-process)
WORKERS ?= 2

test-rust: ## cargo test: the Rust core, without Python
	cargo test --quiet

test-native: build $(VENV)/.peft-installed ## pytest against the compiled extension (fails if it does not import)
	FASTKEYS_IMPLEMENTATION=rust $(PY) -m pytest -q -n $(WORKERS)

test-python: $(VENV)/.peft-installed | $(AFTER_NATIVE) ## pytest against the pure-Python fallback: every test but the torch suite, plus its engine-facing modules; not the tests that already run both engines side by side
	FASTKEYS_IMPLEMENTATION=python $(PY) -m pytest -q -n $(WORKERS) -m "(not torch or engine) and not both_engines"

check: build ## The edit loop (under a minute, torch not needed): ruff, mypy on the package, the torch-free tests
	$(BIN)/ruff check python tests benches fixtures docs scripts
	$(BIN)/mypy --strict --disable-error-code unused-ignore python/fastkeys
	$(PY) -m pytest -q -x -n $(WORKERS) -m "not torch"

format: $(VENV)/.dev-installed ## ruff format and cargo fmt, in place
	$(BIN)/ruff format python tests benches fixtures docs scripts
	$(BIN)/ruff check --fix -q python tests benches fixtures docs scripts
	cargo fmt

fuzz: build ## A long fuzzing run: proptest on the Rust core, hypothesis on both implementations
	PROPTEST_CASES=200000 cargo test --release --quiet fuzz
	FASTKEYS_FUZZ_EXAMPLES=20000 FASTKEYS_IMPLEMENTATION=rust $(PY) -m pytest -q tests/engine/test_differential.py tests/checkpoints/test_scan.py tests/checkpoints/test_header_fuzz.py tests/engine/test_regex.py

wheels: $(VENV)/.dev-installed ## dist/: the abi3 wheel, the sdist and the pure-Python wheel; twine check --strict
	rm -rf dist
	$(BIN)/maturin build --release --quiet --out dist
	$(BIN)/maturin sdist --out dist
	$(PY) scripts/build_pure_wheel.py --out dist
	$(BIN)/twine check --strict dist/*

test-wheels: wheels ## Install each artifact into a fresh virtual environment and check it
	$(PY) -m pytest -q -n $(WORKERS) tests/install

test: ## Everything CI runs: the strict checks, cargo test, pytest under both implementations (with the import budget), the oldest PEFT pair, the wheels
	$(MAKE) --no-print-directory -j2 --output-sync=target test-parts AFTER_NATIVE=test-native

# `make test` runs these two at a time, each part's output printed whole when it ends: the downloads
# overlap the compiles, and single-core steps (mypy, the pip installs) overlap the test runs. The
# two pytest runs (two workers each) run one after the other (AFTER_NATIVE): four workers on two
# cores cost more CPU than they save.
test-parts: lint-rust lint-python test-rust test-native test-python test-compat-slice test-wheels

test-compat-slice: build $(VENV)/.peft-installed compat-slice-fetched ## The slice of test-compat in `make test`: the oldest pair (PEFT 0.17.1, transformers 4.57.6) and diffusers 0.39.0 (its loader tests), both implementations
	$(PY) scripts/compat.py --slice

compat-slice-fetched: $(VENV)/.dev-installed # the slice's overlays, downloaded while torch is (no torch needed)
	$(PY) scripts/compat.py --slice --fetch

test-compat: build $(VENV)/.peft-installed ## PEFT 0.17 to 0.21 (an overlay each, in .venv/compat/): the filter ground truth and fastkeys.peft, both implementations
	$(PY) scripts/compat.py

bench: build $(VENV)/.peft-installed $(VENV)/.bench-installed ## The full benchmark suite (benches/): table, benches/results.json, docs/bench.png
	$(PY) -m benches.run --full

bench-adapters: build $(VENV)/.peft-installed $(VENV)/.bench-installed ## 100 LoRA adapters: PEFT's load_adapter loop vs load_adapters (benches/adapters.json, docs/adapters.png; ~20 min)
	$(PY) -m benches.adapters

bench-width: build $(VENV)/.peft-installed $(VENV)/.bench-installed ## One LoRA adapter at a realistic width (hidden 4096, r=16, bf16 base) against reading its file; memory (benches/width.json, docs/width.png)
	$(PY) -m benches.width

bench-scale: build $(VENV)/.peft-installed $(VENV)/.bench-installed ## 1,000 LoRA adapters against building them with plain torch; memory; the load after a PEFT-path load (benches/scale.json, docs/scale.png; ~10 min)
	$(PY) -m benches.scale

bench-methods: build $(VENV)/.peft-installed $(VENV)/.bench-installed ## LoRA with lm_head saved or trainable tokens, LoHa, LoKr, IA3, HRA, OFT: PEFT's load_adapter loop vs load_adapters; LoRA and LoHa through transformers' loop vs fastkeys.transformers.load_adapters (benches/methods.json)
	$(PY) -m benches.methods

bench-lifecycle: build $(VENV)/.peft-installed $(VENV)/.bench-installed ## Switching and evicting at 30/100/300 LoRA adapters: PEFT's set_adapter/delete_adapter vs fastkeys.peft's (benches/lifecycle.json, docs/lifecycle.png)
	$(PY) -m benches.lifecycle

demo: build ## The seed scenario: what load_state_dict reports, what fastkeys keeps, and the timing
	$(PY) -m fastkeys demo

docs: build $(VENV)/.peft-installed ## Regenerate the generated tables of README.md and docs/*.md
	$(PY) docs/tables.py

lint: lint-rust lint-python ## ruff, mypy --strict (package, tests, benches, fixtures), stubtest, cargo fmt --check, clippy -D warnings

lint-rust: ## cargo fmt --check, clippy -D warnings (needs no Python packages)
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings

lint-python: build $(VENV)/.peft-installed ## ruff, mypy --strict (package, tests, benches, fixtures), stubtest
	$(BIN)/ruff check python tests benches fixtures docs scripts
	$(BIN)/ruff format --check python tests benches fixtures docs scripts
	$(BIN)/mypy --strict python/fastkeys tests benches fixtures
	$(PY) -m mypy.stubtest fastkeys._native

clean: ## Remove build output (keeps .venv)
	rm -rf target dist $(EXTENSION_STAMP) python/fastkeys/_native*.so
