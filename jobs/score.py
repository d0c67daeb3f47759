"""spark-submit / Databricks entry point of batch scoring.

    spark-submit --master spark://HOST:7077 jobs/score.py \
        --conf conf/cluster.yaml --source /shared/incoming/2026-11-22 --batch-id 2026-11-22

Arguments are those of ``dlpipe score``. The Spark master comes from spark-submit (or the
Databricks cluster), not from the config.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipelines import pipeline
from pipelines.cli import job
from pipelines.config import Config

if TYPE_CHECKING:
    from pipelines.score import ScoreResult


def _score(args: argparse.Namespace, config: Config) -> ScoreResult:
    """The stage, called directly with ``dlpipe score``'s parsed options."""
    return pipeline.score_stage(config, args.source, args.output, args.model, args.batch_id)


if __name__ == "__main__":
    sys.exit(job("score", _score))
