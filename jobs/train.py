"""spark-submit / Databricks entry point of the training stage.

    spark-submit --master spark://HOST:7077 jobs/train.py \
        --conf conf/cluster.yaml --dataset /shared/prepared

Arguments are those of ``dlpipe train``. The Spark master comes from spark-submit (or the
Databricks cluster); ``train.num_proc`` ranks need as many executor task slots.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipelines import pipeline
from pipelines.cli import job
from pipelines.config import Config

if TYPE_CHECKING:
    from pipelines.train.driver import TrainResult


def _train(args: argparse.Namespace, config: Config) -> TrainResult:
    """The stage, called directly with ``dlpipe train``'s parsed options."""
    return pipeline.train_stage(config, args.dataset, args.resume)


if __name__ == "__main__":
    sys.exit(job("train", _train))
