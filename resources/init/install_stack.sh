#!/bin/bash
# Cluster init script for the bundle's job clusters (Databricks Runtime 15.4 LTS ML, CPU or GPU).
#
# Why: 15.4 LTS ML ships MLflow 2.13.1, TensorFlow 2.16 with Keras 3 and a Horovod 0.28.1
# compiled against that TensorFlow (check with `pip list` on a cluster: the script does not
# depend on what exactly is there). This project needs TensorFlow 2.15.1 (Keras 2:
# under Keras 3 Horovod's DistributedOptimizer silently stops averaging gradients),
# mlflow>=3.17,<3.19, pyarrow 14.0.2, petastorm 0.13.1 and Horovod 0.28.1 built against
# TensorFlow 2.15.1. Cluster libraries cannot do this alone: pip skips a Horovod wheel whose
# version (0.28.1) is already installed, and it must replace the runtime's TensorFlow first.
#
# What: one pip resolve of the pinned stack into the cluster's Python (driver and workers run
# this script alike), then Horovod from $DLPIPE_HOROVOD_WHEELS/py311-tf2.15.1[-gpu]/ (set in the
# GPU cluster's spark_env_vars; unset on the CPU cluster, which only drops the runtime's Horovod).
# A missing wheel is built on the node once (about 10 minutes) and copied to that folder for the
# next cluster start. The project's own wheel comes afterwards as a task library; its
# dependencies are then already satisfied.
#
# Not run here: no Databricks workspace was available when this was written. The pins below are
# checked against pyproject.toml by tests/unit/test_bundle.py; the script's behaviour on a real
# node (GPU detection, /Volumes access from an init script, the NCCL build) is not verified.
# Its output is in the cluster's init script logs (set cluster_log_conf to keep them).
set -euo pipefail

PY=/databricks/python/bin/python
TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1

log() { echo "dlpipe init: $*" >&2; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAVOUR=gpu
    # TensorFlow with its CUDA 12 libraries as pip packages, independent of the image's CUDA.
    TF_SPEC="tensorflow[and-cuda]==${TF_VERSION}"
else
    FLAVOUR=cpu
    # The `tensorflow` distribution (not tensorflow-cpu) so that it replaces the runtime's
    # tensorflow in place instead of installing a second distribution over the same files.
    TF_SPEC="tensorflow==${TF_VERSION}"
fi

# The project's runtime dependencies, as in pyproject.toml, minus pyspark (the runtime's Spark).
# BEGIN PINS (kept equal to pyproject.toml by tests/unit/test_bundle.py)
PINS=(
    "pyarrow==14.0.2"
    "numpy==1.26.*"
    "pandas==2.2.*"
    "protobuf<5"
    "petastorm==0.13.1"
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

log "installing ${TF_SPEC} and the pinned stack (${FLAVOUR} node)"
"$PY" -m pip install --quiet --disable-pip-version-check "$TF_SPEC" "keras>=2.15,<2.16" "${PINS[@]}"

# The runtime's Horovod is compiled against its TensorFlow 2.16: it would fail to load.
"$PY" -m pip uninstall --quiet --yes horovod >/dev/null 2>&1 || true

build_horovod() {
    # Build the wheel on this node, against the TensorFlow just installed; print its path.
    local out gpu_env=()
    out=$(mktemp -d)
    if ! command -v cmake >/dev/null 2>&1; then  # Ubuntu's CMake 3.x suits Horovod's Gloo
        apt-get update -qq && apt-get install -y -qq cmake g++ >/dev/null
    fi
    if [[ $FLAVOUR == gpu ]] && command -v nvcc >/dev/null && [[ -f /usr/include/nccl.h ]]; then
        gpu_env=(HOROVOD_GPU_OPERATIONS=NCCL)
    elif [[ $FLAVOUR == gpu ]]; then
        log "no nvcc or NCCL headers: building Horovod with Gloo allreduce on host memory"
    fi
    env HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 ${gpu_env[@]+"${gpu_env[@]}"} MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel --quiet --no-build-isolation --no-deps --no-cache-dir -w "$out" \
        "horovod==${HOROVOD_VERSION}" >&2
    ls "$out"/horovod-*.whl
}

if [[ -n "${DLPIPE_HOROVOD_WHEELS:-}" ]]; then
    suffix=""
    [[ $FLAVOUR == gpu ]] && suffix="-gpu"
    dir="${DLPIPE_HOROVOD_WHEELS%/}/py311-tf${TF_VERSION}${suffix}"
    wheel=$(ls "$dir"/horovod-"${HOROVOD_VERSION}"-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
        log "no Horovod wheel in $dir: building it on this node"
        wheel=$(build_horovod)
        # Several nodes may finish at once: copy under a private name, then rename.
        if mkdir -p "$dir" && cp "$wheel" "$dir/.$(hostname).$$.tmp" \
            && mv -f "$dir/.$(hostname).$$.tmp" "$dir/$(basename "$wheel")"; then
            log "saved $(basename "$wheel") to $dir for the next cluster start"
        else
            log "warning: could not save the Horovod wheel to $dir (next start builds it again)"
        fi
    fi
    log "installing $(basename "$wheel")"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$wheel"
fi

# Fail the cluster start, with the reason in the init script log, rather than train wrongly.
"$PY" - <<'CHECK'
import os

import keras
import mlflow
import petastorm
import pyarrow
import tensorflow as tf

assert tf.__version__ == "2.15.1", f"TensorFlow {tf.__version__}, need 2.15.1"
assert keras.__version__.startswith("2."), f"Keras {keras.__version__}: Horovod needs Keras 2"
assert pyarrow.__version__ == "14.0.2", f"pyarrow {pyarrow.__version__}, need 14.0.2"
assert petastorm.__version__ == "0.13.1", f"petastorm {petastorm.__version__}, need 0.13.1"
assert mlflow.__version__.startswith("3."), f"MLflow {mlflow.__version__}, need 3.x"
if os.environ.get("DLPIPE_HOROVOD_WHEELS"):
    import horovod.spark  # noqa: F401
    import horovod.tensorflow  # noqa: F401  (fails on a wheel built against another TF)
print("dlpipe init: stack ok: tensorflow", tf.__version__, "keras", keras.__version__,
      "mlflow", mlflow.__version__)
CHECK
