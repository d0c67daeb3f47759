"""spark-submit / Databricks entry point of the ingest stage.

    spark-submit --master spark://HOST:7077 jobs/ingest.py \
        --conf conf/cluster.yaml --source /shared/images --output /shared/prepared

Arguments are those of ``dlpipe ingest``. The Spark master comes from spark-submit (or the
Databricks cluster), not from the config, unless ``--set spark.master=...`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipelines import pipeline
from pipelines.cli import job
from pipelines.config import Config

if TYPE_CHECKING:
    from pipelines.ingest import IngestResult


def _ingest(args: argparse.Namespace, config: Config) -> IngestResult:
    """The stage, called directly with ``dlpipe ingest``'s parsed options."""
    return pipeline.ingest_stage(config, args.source, args.output)


if __name__ == "__main__":
    sys.exit(job("ingest", _ingest))
