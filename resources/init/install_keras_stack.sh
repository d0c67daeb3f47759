#!/bin/bash
# Cluster init script of the bundle's `keras` target (Databricks Runtime 17.3 LTS ML, CPU or GPU).
#
# Why: 17.3 LTS ML (Spark 4.0, Python 3.12, numpy 2.1, pyarrow 19) has no Horovod and no
# Petastorm, so the pinned stack cannot run there; the Keras stack can (docs/stack.md): Keras 3
# on JAX, ranks as Spark barrier tasks (train.launcher: keras), the plain-pyarrow reader. The
# runtime's Keras 3 runs on TensorFlow by default and it has no JAX: this installs JAX (CUDA 12
# wheels on a GPU node) and the project's pins, and leaves Spark, TensorFlow and the rest alone.
# KERAS_BACKEND=jax is set by the project itself before Keras is imported (keras_api.py).
#
# Not run here: no Databricks workspace was available when this was written. The pins below are
# checked against pyproject.toml by tests/unit/test_bundle.py; the script's behaviour on a real
# node (GPU detection, the CUDA wheels) is not verified.
set -euo pipefail

PY=/databricks/python/bin/python
JAX_VERSION=0.9.2

log() { echo "dlpipe init: $*" >&2; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=gpu
    JAX_SPEC="jax[cuda12]==${JAX_VERSION}"
else
    FLAVOUR=cpu
    JAX_SPEC="jax[cpu]==${JAX_VERSION}"
fi

# The project's runtime dependencies, as in pyproject.toml, minus pyspark (the runtime's Spark).
# BEGIN PINS (kept equal to pyproject.toml by tests/unit/test_bundle.py)
PINS=(
    "pyarrow==19.0.1"
    "numpy==2.1.*"
    "keras==3.15.1"
    "pandas==2.2.*"
    "mlflow>=3.17,<3.19"
    "pillow>=10,<12"
    "scikit-learn>=1.4,<1.6"
    "scipy>=1.11,<1.14"
    "pyyaml>=6"
    "matplotlib>=3.8,<3.10"
    "cloudpickle>=2"
    "psutil>=5"
    "packaging>=23"
    "pydantic>=2,<3"
    "jinja2>=3.1"
    "xxhash>=3,<5"
)
# END PINS

log "installing ${JAX_SPEC} and the Keras stack (${FLAVOUR} node)"
"$PY" -m pip install --quiet --disable-pip-version-check "$JAX_SPEC" "${PINS[@]}"
# A mixed stack is refused by the preflight: no Horovod or Petastorm beside Keras 3.
"$PY" -m pip uninstall --quiet --yes horovod petastorm >/dev/null 2>&1 || true

# Fail the cluster start, with the reason in the init script log, rather than train wrongly.
KERAS_BACKEND=jax "$PY" - <<'CHECK'
import jax
import keras
import mlflow
import pyarrow

assert keras.__version__.startswith("3."), f"Keras {keras.__version__}, need 3.x"
assert keras.backend.backend() == "jax", f"Keras on {keras.backend.backend()}, need JAX"
assert int(pyarrow.__version__.split(".")[0]) >= 15, f"pyarrow {pyarrow.__version__}"
assert mlflow.__version__.startswith("3."), f"MLflow {mlflow.__version__}, need 3.x"
print("dlpipe init: Keras stack ok: keras", keras.__version__, "jax", jax.__version__,
      jax.devices()[0].platform, "mlflow", mlflow.__version__)
CHECK
