# Two entry points, each sets up .venv itself if it is missing:
#   make demo   - import the paper's distilled 1M student, plan with it on all MT30 tasks, evaluate it on 3 tasks in MJX
#   make test   - the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax

.PHONY: demo test lint bench venv clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,torch]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m mtdistill_jax.demo

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=15

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) benchmarks/update_step.py
	$(PY) benchmarks/plan.py
	$(PY) benchmarks/envs.py --num_envs 1,64 --impls jax
	$(PY) benchmarks/distill_step.py

clean:
	rm -rf $(VENV) .cache
