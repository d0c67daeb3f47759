"""spark-submit / Databricks entry point of batch scoring.

    spark-submit --master spark://HOST:7077 jobs/score.py \
        --conf conf/cluster.yaml --source /shared/incoming/2026-11-22 --batch-id 2026-11-22

Arguments are those of ``dlpipe score``. The Spark master comes from spark-submit (or the
Databricks cluster), not from the config.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", "--set", "spark.master=null", *sys.argv[1:]]))
