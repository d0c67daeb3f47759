"""The peer side of the peer benchmark: Horovod's own ``KerasEstimator`` on a prepared dataset.

In: a prepared dataset (``split=train|val|test/`` Petastorm Parquet, ``image`` cells of
``np.save`` uint8 bytes, ``label`` ints), a Keras model as JSON, epochs, seed, the per-rank
learning rate, batch size and ranks. Out: one line ``PEER_RESULT {json}`` on stdout: test
accuracy, the epochs' history, the phase marks (``time.time()`` at each phase boundary)
and the versions of the peer environment.

Run by the peer environment's Python (``python peer_runner.py --dataset ... --out ...``),
never imported by it from ``pipelines``: that environment has pyarrow < 11, horovod,
TensorFlow, pyspark and numpy, none of the project's own dependencies. It uses the
standard library and those only, so it is importable on the project side as well (the
tests parse its output format from here).

The estimator is driven as its documentation and ``examples/spark/keras`` do: a DataFrame of
float feature arrays and one-hot label vectors, ``LocalStore``, ``num_proc`` ranks on the
local Spark session, then ``KerasModel.transform`` on the test split for the accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

#: Prefix of the one stdout line that carries the result.
RESULT_PREFIX = "PEER_RESULT "
#: Phase boundaries, in order, as marked by :func:`main` (``launched`` comes from the caller).
MARKS = ("launched", "imported", "data_ready", "fit_start", "prepared", "trained", "fit_end",
         "evaluated")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The runner's command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="prepared dataset directory")
    parser.add_argument("--model-json", required=True, help="file of model.to_json()")
    parser.add_argument("--work", required=True, help="scratch folder (store, Spark)")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, required=True, help="per rank")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--launched", type=float, default=None, help="caller's time.time()")
    return parser.parse_args(argv)


def result_line(result: dict[str, Any]) -> str:
    """The stdout line carrying ``result``."""
    return RESULT_PREFIX + json.dumps(result, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """Train with ``KerasEstimator``, evaluate with ``KerasModel.transform``, print the result."""
    args = parse_args(argv)
    marks = {"launched": args.launched or time.time()}
    # Spark's Python workers and Horovod's ranks must run this interpreter (the peer env),
    # not whatever ``python3`` is first on PATH.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import horovod
    import horovod.spark.keras as hvd_keras
    import numpy as np
    import pyarrow
    import pyspark
    import tensorflow as tf
    from horovod.spark.common.store import LocalStore
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    marks["imported"] = time.time()

    spark = (
        SparkSession.builder.master(f"local[{args.num_proc}]")
        .appName("peer-keras-estimator")
        .config("spark.local.dir", os.path.join(args.work, "spark"))
        .config("spark.sql.shuffle.partitions", str(args.num_proc))
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        with open(args.model_json, encoding="utf-8") as f:
            model = tf.keras.models.model_from_json(f.read())
        num_classes = int(model.outputs[0].shape[-1])

        @F.pandas_udf(T.ArrayType(T.FloatType()))
        def pixels(cells):  # np.save bytes -> flat float32 in [0, 1], as our feed divides
            import io

            import pandas as pd

            return pd.Series(
                [
                    (np.load(io.BytesIO(c)).reshape(-1).astype(np.float32) / np.float32(255.0))
                    for c in cells
                ]
            )

        @F.udf(T.ArrayType(T.DoubleType()))
        def one_hot(label):
            row = [0.0] * num_classes
            row[int(label)] = 1.0
            return row

        def split(name: str, is_val: bool):
            path = os.path.join(args.dataset, f"split={name}")
            df = spark.read.parquet(path).select("image", "label")
            return df.select(
                pixels("image").alias("features"),
                F.col("label").cast("int").alias("label"),
                array_to_vector(one_hot("label")).alias("label_vec"),
                F.lit(is_val).alias("is_val"),
            )

        # Decoded and cached before fit, so that fit times the estimator's own work.
        train_df = split("train", False).unionByName(split("val", True)).cache()
        test_df = split("test", False).cache()
        rows = {"train_and_val": train_df.count(), "test": test_df.count()}
        marks["data_ready"] = time.time()

        optimizer = tf.keras.optimizers.legacy.Adam(learning_rate=args.learning_rate)
        estimator = hvd_keras.KerasEstimator(
            num_proc=args.num_proc,
            store=LocalStore(os.path.join(args.work, "store")),
            model=model,
            optimizer=optimizer,
            loss="categorical_crossentropy",
            metrics=["accuracy"],
            feature_cols=["features"],
            label_cols=["label_vec"],
            validation="is_val",
            # Horovod 0.28.1 reloads the compiled model in each rank with hvd.load_model,
            # which maps "adam" to the new Keras Adam: it rejects the legacy Adam's "decay"
            # (the legacy optimizer is what hvd.DistributedOptimizer wraps). Keras looks
            # in this scope first, so the ranks rebuild the optimizer that was given.
            custom_objects={"adam": _distributed_legacy_adam},
            batch_size=args.batch_size,
            epochs=args.epochs,
            random_seed=args.seed,
            use_gpu=False,
            verbose=2,
        )
        # Marks inside fit: Parquet preparation, the Horovod job, the driver's model reload.
        _mark_before(estimator, "_fit_on_prepared_data", "prepared", marks)
        _mark_before(estimator, "_create_model", "trained", marks)
        marks["fit_start"] = time.time()
        trained = estimator.fit(train_df)
        marks["fit_end"] = time.time()

        scored = trained.transform(test_df).select("label", "label_vec__output").collect()
        predicted = np.array([int(np.argmax(r["label_vec__output"].toArray())) for r in scored])
        truth = np.array([r["label"] for r in scored])
        accuracy = float((predicted == truth).mean()) if len(truth) else float("nan")
        marks["evaluated"] = time.time()
        history = {k: [float(x) for x in v] for k, v in trained.getHistory().items()}
    finally:
        spark.stop()
    result = {
        "test_accuracy": accuracy,
        "test_rows": len(truth),
        "rows": rows,
        "history": history,
        "marks": marks,
        "versions": {
            "python": sys.version.split()[0],
            "horovod": horovod.__version__,
            "tensorflow": tf.__version__,
            "pyspark": pyspark.__version__,
            "pyarrow": pyarrow.__version__,
            "numpy": np.__version__,
            "petastorm": _version("petastorm"),
            "pandas": _version("pandas"),
        },
    }
    print(result_line(result), flush=True)
    return 0


def _mark_before(obj: Any, method: str, mark: str, marks: dict[str, float]) -> None:
    """Record ``time.time()`` as ``marks[mark]`` whenever ``obj.method`` is called."""
    original = getattr(obj, method)

    def marked(*args: Any, **kwargs: Any) -> Any:
        marks[mark] = time.time()
        return original(*args, **kwargs)

    setattr(obj, method, marked)


def _distributed_legacy_adam(**config: Any) -> Any:
    """``hvd.DistributedOptimizer`` around the legacy Adam of ``config`` (see ``main``)."""
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    return hvd.DistributedOptimizer(tf.keras.optimizers.legacy.Adam.from_config(config))


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "?"))


if __name__ == "__main__":
    sys.exit(main())
