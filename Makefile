# spark-dl-pipelines: set-up, tests and the demo job.
#
#   make run     set up .venv if needed, then run the main job on the embedded default
#   make test    set up .venv if needed, then run the test suite
#
# Set-up is idempotent: .venv/.ready is rebuilt only when pyproject.toml or this file change.
# Horovod has no wheels on the registry; it is compiled once per machine against the pinned
# TensorFlow into a wheel cache outside the clone, keyed by Python and TensorFlow version
# (pip's own cache keys it by sdist only and would reinstall a wheel with the wrong ABI).
#
# STACK=keras selects the second stack instead (Python 3.12, Spark 4, Keras 3 on JAX, numpy 2;
# no TensorFlow, Horovod or Petastorm) in its own venv, .venv-keras/: `make venv STACK=keras`,
# `make test STACK=keras` (the tests under tests/keras/). GPU=1 with it: JAX's CUDA 12 wheels.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

STACK ?= default
ifeq ($(filter default keras,$(STACK)),)
$(error STACK=$(STACK): use STACK=default (the pinned stack) or STACK=keras)
endif
TF_VERSION := 2.15.1
HOROVOD_VERSION := 0.28.1
# GPU=1: TensorFlow with CUDA (the `gpu` extra) and Horovod built with NCCL; needs the CUDA
# toolkit and NCCL headers (docs/gpu.md). A venv holds one flavour: `make clean` first.
GPU ?= 0
ifeq ($(STACK),keras)
# Python 3.12: python3.12 on the path, else pyenv's newest 3.12 (a pyenv shim of a version
# that is not selected exists but does not run). PYTHON=/path/to/python3.12 overrides both.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(or $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null),$(shell \
  v=$$(pyenv latest 3.12 2>/dev/null) && test -x "$$(pyenv root)/versions/$$v/bin/python3.12" \
  && echo "$$(pyenv root)/versions/$$v/bin/python3.12"),python3.12)
endif
VENV := .venv-keras
FLAVOUR := $(if $(filter 1,$(GPU)),keras-gpu,keras)
else
PYTHON ?= python3.11
VENV := .venv
FLAVOUR := $(if $(filter 1,$(GPU)),gpu,cpu)
endif
BIN := $(VENV)/bin
HOROVOD_GPU_ENV := $(if $(filter 1,$(GPU)),HOROVOD_GPU_OPERATIONS=NCCL,)
WHEEL_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/spark-dl-pipelines/wheels/py311-tf$(TF_VERSION)$(if $(filter 1,$(GPU)),-gpu,)
STAMP := $(VENV)/.ready$(if $(filter 1,$(GPU)),-gpu,)
# The Keras stack's processes: Keras on JAX, JAX on the CPU unless GPU=1.
KERAS_ENV := KERAS_BACKEND=jax $(if $(filter 1,$(GPU)),,JAX_PLATFORMS=cpu)
DIST ?= dist
DIST_ENV ?= build/dist-env
PYTEST_ARGS ?=

.PHONY: help venv test test-fast run lint bench bench-docs prereqs prereqs-keras pinned-only clean wheel dist docs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

venv: $(STAMP)  ## create or update the project environment in .venv/ (GPU=1: CUDA; STACK=keras: .venv-keras/)

run: venv  ## the main job: bundled digits -> ingest -> train -> register -> score -> report
	$(if $(filter keras,$(STACK)),$(KERAS_ENV) )$(BIN)/dlpipe run

# `make test` (CI, the README) runs both stacks: the default suite, then the Keras stack's
# (its own venv). `make test STACK=default` or `STACK=keras` runs one.
ifeq ($(STACK),keras)
test: venv  ## both stacks' suites (STACK=default or STACK=keras given: that one only)
	$(KERAS_ENV) $(BIN)/pytest tests/keras $(PYTEST_ARGS)
else ifeq ($(origin STACK),command line)
test: venv
	$(BIN)/pytest $(PYTEST_ARGS)
else
test: venv
	$(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test STACK=keras
endif

test-fast: venv  ## tests without the slow (Horovod/MLflow end-to-end) ones
	$(if $(filter keras,$(STACK)),$(KERAS_ENV) $(BIN)/pytest -m "not slow" tests/keras,$(BIN)/pytest -m "not slow") $(PYTEST_ARGS)

lint: venv  ## ruff over the code and tests
	$(BIN)/ruff check pipelines jobs tests

docs: venv  ## regenerate docs/configuration.md from the config model
	$(BIN)/python -c "from pipelines.config_docs import REFERENCE_PAGE, reference; open(REFERENCE_PAGE, 'w').write(reference())"

bench: pinned-only venv  ## benchmarks, with baselines measured in the same run
	$(BIN)/dlpipe bench all

bench-docs: venv  ## run bench all and scale on an idle machine, their tables into docs/performance.md
	$(BIN)/dlpipe bench all --markdown docs/performance.md
	$(BIN)/dlpipe bench scale --markdown docs/performance.md

prereqs:  ## check that python3.11, Java 11/17, g++ and CMake 3.x are present
	@missing=0; \
	if ! command -v $(PYTHON) >/dev/null; then \
	  echo "missing: $(PYTHON) (TensorFlow 2.15 has wheels for Python 3.9-3.11 only; install Python 3.11, e.g. 'apt-get install python3.11 python3.11-venv' or pyenv, or pass PYTHON=/path/to/python3.11)"; missing=1; \
	elif ! $(PYTHON) -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then \
	  echo "wrong python: $(PYTHON) is $$($(PYTHON) -V 2>&1), need 3.11 with the venv module (pass PYTHON=/path/to/python3.11)"; missing=1; fi; \
	java_bin=$${JAVA_HOME:+$$JAVA_HOME/bin/}java; \
	if ! command -v $$java_bin >/dev/null; then \
	  echo "missing: Java 17 (Spark 3.5 needs Java 11 or 17; install e.g. 'apt-get install openjdk-17-jre-headless' or set JAVA_HOME)"; missing=1; \
	else jv=$$($$java_bin -version 2>&1 | sed -nE '1s/.*version "([0-9]+).*/\1/p'); \
	  case "$$jv" in 11|17) ;; *) echo "wrong java: $$java_bin is version '$$jv', Spark 3.5 needs 11 or 17 (set JAVA_HOME)"; missing=1;; esac; fi; \
	if ! ls $(WHEEL_CACHE)/horovod-$(HOROVOD_VERSION)-*.whl >/dev/null 2>&1; then \
	  command -v g++ >/dev/null || { echo "missing: g++ (needed once to build Horovod; 'apt-get install g++')"; missing=1; }; \
	  if ! command -v cmake >/dev/null; then echo "missing: cmake 3.x (needed once to build Horovod; 'apt-get install cmake')"; missing=1; \
	  else case "$$(cmake --version | sed -nE '1s/.* ([0-9]+)\..*/\1/p')" in 3) ;; *) echo "wrong cmake: $$(cmake --version | head -1); Horovod's bundled Gloo needs CMake 3.x ('apt-get install cmake')"; missing=1;; esac; fi; \
	fi; \
	exit $$missing

# The benchmarks measure the pinned stack's Horovod, Petastorm and tf.data paths; `dist`
# packs Horovod. Neither exists on the Keras stack (every stage does: make run STACK=keras).
pinned-only:
	@if [ "$(STACK)" = keras ]; then \
	  echo "make $(MAKECMDGOALS) STACK=keras: the benchmarks and dist are the pinned stack's (use STACK=default)"; exit 1; fi

prereqs-keras:  ## check that python3.12 and Java 17/21 are present (STACK=keras)
	@missing=0; \
	if ! $(PYTHON) -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then \
	  if ! $(PYTHON) -V >/dev/null 2>&1; then \
	    echo "missing: $(PYTHON) (the Keras stack runs on Python 3.12; install it, e.g. 'apt-get install python3.12 python3.12-venv' or 'pyenv install 3.12', or pass PYTHON=/path/to/python3.12)"; \
	  else echo "wrong python: $(PYTHON) is $$($(PYTHON) -V 2>&1), need 3.12 with the venv module (pass PYTHON=/path/to/python3.12)"; fi; \
	  missing=1; fi; \
	java_bin=$${JAVA_HOME:+$$JAVA_HOME/bin/}java; \
	if ! command -v $$java_bin >/dev/null; then \
	  echo "missing: Java 17 (Spark 4 needs Java 17 or 21; install e.g. 'apt-get install openjdk-17-jre-headless' or set JAVA_HOME)"; missing=1; \
	else jv=$$($$java_bin -version 2>&1 | sed -nE '1s/.*version "([0-9]+).*/\1/p'); \
	  case "$$jv" in 17|21) ;; *) echo "wrong java: $$java_bin is version '$$jv', Spark 4 needs 17 or 21 (set JAVA_HOME)"; missing=1;; esac; fi; \
	exit $$missing

wheel: venv  ## the project's wheel in $(DIST)/ (+ the same as .zip for spark-submit --py-files)
	@mkdir -p $(DIST); rm -f $(DIST)/spark_dl_pipelines-*
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w $(DIST) .
	@# PySpark puts only .zip/.egg/.jar --py-files on the executors' path; a pure wheel is a zip.
	@for w in $(DIST)/spark_dl_pipelines-*.whl; do cp "$$w" "$${w%.whl}.zip"; done
	@ls $(DIST)/spark_dl_pipelines-*

dist: pinned-only wheel  ## + $(DIST)/dlpipe-env.tar.gz: the whole stack packed for --archives (bare nodes)
	rm -rf $(DIST_ENV)
	$(PYTHON) -m venv $(DIST_ENV)
	$(DIST_ENV)/bin/python -m pip install --quiet "$$(ls $(DIST)/spark_dl_pipelines-*.whl)[$(FLAVOUR)]"
	$(DIST_ENV)/bin/python -m pip install --quiet --no-deps $(WHEEL_CACHE)/horovod-$(HOROVOD_VERSION)-*.whl
	$(DIST_ENV)/bin/python -c "import pipelines.cli, horovod.tensorflow, horovod.spark; print('dist env ok')"
	@# Level 1: a quarter of the packing time of the default for a few % more bytes.
	$(BIN)/venv-pack --force --compress-level 1 -p $(DIST_ENV) -o $(DIST)/dlpipe-env.tar.gz
	@ls -l $(DIST)/dlpipe-env.tar.gz

ifeq ($(STACK),keras)
$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory prereqs-keras
	@test -x $(BIN)/python || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet -e '.[dev,$(FLAVOUR)]'
	$(KERAS_ENV) $(BIN)/python -c "import jax, keras, pyspark; print('keras', keras.__version__, \
	  'on', keras.backend.backend(), 'jax', jax.__version__, jax.devices()[0].platform, \
	  'pyspark', pyspark.__version__, 'ok')"
	@touch $@
else
$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory prereqs
	@test -x $(BIN)/python || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" "setuptools>=68" wheel
	$(BIN)/python -m pip install --quiet -e '.[dev,$(FLAVOUR)]'
	@if ! ls $(WHEEL_CACHE)/horovod-$(HOROVOD_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building Horovod $(HOROVOD_VERSION) against TensorFlow $(TF_VERSION) (once per machine, about 8 minutes)"; \
	  tmp=$$(mktemp -d); mkdir -p $(WHEEL_CACHE); \
	  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 $(HOROVOD_GPU_ENV) \
	  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j$$(nproc) \
	  PATH=$(CURDIR)/$(BIN):$$PATH \
	    $(BIN)/python -m pip wheel --quiet --no-build-isolation --no-deps --no-cache-dir -w $$tmp horovod==$(HOROVOD_VERSION); \
	  mv $$tmp/horovod-*.whl $(WHEEL_CACHE)/; rm -rf $$tmp; fi
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall $(WHEEL_CACHE)/horovod-$(HOROVOD_VERSION)-*.whl
	$(BIN)/python -c "import horovod.tensorflow, horovod.spark; print('horovod', horovod.__version__, 'ok')"
	@touch $@

endif

clean:  ## remove the environment and local outputs (not the Horovod wheel cache)
	rm -rf $(VENV) work .pytest_cache build $(DIST)
