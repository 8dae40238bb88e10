# Quick start: `make demo` and `make test`. Each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch build this project is developed and tested with (installed from the local package cache).
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: demo test docs bench-smoke bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hydraclean demo

# one pytest-xdist worker per core, each on one torch thread (tests/conftest.py); TEST_WORKERS=0 runs them serially
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

clean:
	rm -rf $(VENV) build *.egg-info docs/_build .pytest_cache

DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html
	$(BIN)/python docs/check_offline.py docs/_build/html

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	touch $(BENCH_STAMP)

# Every method, score variant and paper experiment at tiny size (CI runs it; a few minutes).
bench-smoke: $(BENCH_STAMP)
	$(BIN)/python benchmarks/suite.py --smoke --out $(CURDIR)/build/bench-smoke/suite_smoke.md
	$(BIN)/python benchmarks/score_ablation.py --dir $(CURDIR)/build/bench-smoke
	$(BIN)/python benchmarks/hessian_detection.py --smoke --out $(CURDIR)/build/bench-smoke/hessian_detection.md
	$(BIN)/python benchmarks/paper.py --smoke --out-dir $(CURDIR)/build/bench-smoke
	$(BIN)/python benchmarks/flag_count.py --settings tabular-cc tabular-cc-clean --cache $(CURDIR)/build/bench-smoke/flag_count --out $(CURDIR)/build/bench-smoke/flag_count.md
	$(BIN)/python benchmarks/summarize.py --dir $(CURDIR)/build/bench-smoke
	$(BIN)/python benchmarks/selected_direction.py --settings tabular-cc --cache $(CURDIR)/build/bench-smoke/flag_count
	$(BIN)/python benchmarks/cluster_flags.py --settings digits-sym-0.2 --cache $(CURDIR)/build/bench-smoke/cluster_flags
	$(BIN)/python benchmarks/one_run_peers.py --smoke --settings digits-sym-0.2 tabular-cc --out $(CURDIR)/build/bench-smoke/one_run_peers.md
	$(BIN)/python benchmarks/ghost_choice.py --smoke --out $(CURDIR)/build/bench-smoke/ghost_choice.md
	$(BIN)/python benchmarks/conv_products.py --smoke --out $(CURDIR)/build/bench-smoke/conv_products.md

# On a CUDA machine: GPU scoring against float64 on the CPU (tests/test_cuda.py), then the cost on full
# Fashion-MNIST with LeNet-5 and DenseNet-BC-40 (docs/benchmarks.md, "On a GPU"), then the data-parallel
# fit on all of that machine's CPUs (docs/large_data.rst).
gpu-check: $(BENCH_STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_estimator.py -k cuda
	$(BIN)/python benchmarks/gpu_check.py --densenet-train 10000 --out docs/_generated/gpu_check.md
	$(BIN)/python benchmarks/distributed.py --threads $$(nproc) --processes 2 --repeats 2 \
		--out docs/_generated/distributed_many_cores.md

# The benchmarks behind docs/benchmarks.md on this machine's CPUs (not part of CI; hours on 2 cores).
# The Fashion-MNIST settings were run on a GPU by benchmarks/gpu_suite.sh; on a CPU, the second
# suite line runs the same settings.
bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/overhead.py --epochs 3 --out docs/_generated/overhead.md
	$(BIN)/python benchmarks/overhead.py --architectures --repeats 2 --out docs/_generated/overhead_architectures.md
	$(BIN)/python benchmarks/ghost_choice.py --out docs/_generated/ghost_choice.md
	$(BIN)/python benchmarks/conv_products.py --fits 2 --out docs/_generated/conv_products.md
	$(BIN)/python benchmarks/batchnorm_route.py --out docs/_generated/batchnorm_route.md
	$(BIN)/python benchmarks/batchnorm_constant.py --out docs/_generated/batchnorm_constant.md
	$(BIN)/python benchmarks/autocast_effect.py --out docs/_generated/autocast.md
	$(BIN)/python benchmarks/distributed.py --out docs/_generated/distributed.md
	$(BIN)/python benchmarks/cluster_choice.py --out docs/_generated/cluster_choice.md
	$(BIN)/python benchmarks/suite.py --dataset digits --out docs/_generated/suite_digits.md
	$(BIN)/python benchmarks/aum_threshold.py --out docs/_generated/aum_threshold.md
	$(BIN)/python benchmarks/suite.py --dataset fashion --seeds 2 --out docs/_generated/suite_fashion.md
	$(BIN)/python benchmarks/suite.py --dataset topics --out docs/_generated/suite_topics.md
	$(BIN)/python benchmarks/suite.py --dataset tabular --out docs/_generated/suite_tabular.md
	$(BIN)/python benchmarks/flag_count.py --out docs/_generated/flag_count.md
	$(BIN)/python benchmarks/score_selection.py --out docs/_generated/score_selection.md
	$(BIN)/python benchmarks/selected_direction.py --out docs/_generated/selected_direction.md
	$(BIN)/python benchmarks/cluster_flags.py --out docs/_generated/cluster_flags.md
	$(BIN)/python benchmarks/one_run_peers.py --out docs/_generated/one_run_peers.md
	$(BIN)/python benchmarks/hessian_detection.py --out docs/_generated/hessian_detection.md
	$(BIN)/python benchmarks/paper.py --out-dir docs/_generated
	$(BIN)/python benchmarks/score_ablation.py --out docs/_generated/score_ablation.md
	$(BIN)/python benchmarks/summarize.py --dir docs/_generated
