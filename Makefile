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

# The main job on the embedded default: G²RPO-A on a tiny random-init Qwen3, the shipped
# arithmetic set, CPU, about two minutes. Re-running resumes; `rm -r runs/demo` starts over.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m g2rpo_jax.train --config=experiments/configs/g2rpo.py:demo $(DEMO_ARGS)
	$(PY) -m g2rpo_jax.plot runs/demo

# pytest exits 5 when it collected no test; that would mean the suite vanished, so it fails loudly.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests - the suite is missing" >&2; exit 1; fi; \
	exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
