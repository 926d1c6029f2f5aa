# `make demo` and `make test` create .venv from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# 2 pytest workers on CI's 2 cores; override with `make test PYTEST_ARGS=...`.
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: demo test venv clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
