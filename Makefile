# `make demo` and `make test` create .venv from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# 2 pytest workers on CI's 2 cores; override with `make test PYTEST_ARGS=...`.
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The main job on the embedded default: G²RPO-A against GRPO and fixed guidance on 4-digit
# addition, a tiny Qwen3, CPU, 3 seeds (experiments/demo.py). Re-running reuses finished runs;
# `rm -r runs/demo` starts over; e.g. `make demo DEMO_ARGS="--seeds 0 --rl_steps 100"` runs less.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) experiments/demo.py $(DEMO_ARGS)

# pytest exits 5 when it collected no test; that would mean the suite vanished, so it fails loudly.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests - the suite is missing" >&2; exit 1; fi; \
	exit $$status

# `make bench` runs the benchmarks of experiments/benchmarks/, each printing a table and last lines
# `NAME ratio: X.XX` (ours / peer, higher is better). Peers run in their own venvs, each made on first
# use from experiments/benchmarks/requirements-<name>.txt as .venv-<name> (.venv-trl: TRL on torch
# 2.13 CPU; .venv-tunix: Google Tunix). Extra flags per script, e.g. `make bench RL_STEP_ARGS=--quick`.
BENCH_DIR := experiments/benchmarks
PEER_STAMPS := $(patsubst $(BENCH_DIR)/requirements-%.txt,.venv-%/.installed,$(wildcard $(BENCH_DIR)/requirements-*.txt))
SAMPLER_ARGS ?=
RL_STEP_ARGS ?=
UTILIZATION_ARGS ?=
REWARDS_ARGS ?=

.venv-%/.installed: $(BENCH_DIR)/requirements-%.txt
	test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-$*/bin/python -m pip install --quiet -r $<
	touch $@

bench: $(STAMP) $(PEER_STAMPS)
	$(PY) $(BENCH_DIR)/sampler.py --tunix-python .venv-tunix/bin/python $(SAMPLER_ARGS)
	$(PY) $(BENCH_DIR)/rl_step.py --trl-python .venv-trl/bin/python $(RL_STEP_ARGS)
	$(PY) $(BENCH_DIR)/utilization.py $(UTILIZATION_ARGS)
	$(PY) $(BENCH_DIR)/rewards.py $(REWARDS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
