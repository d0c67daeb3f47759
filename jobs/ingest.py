"""spark-submit / Databricks entry point of the ingest stage.

    spark-submit --master spark://HOST:7077 jobs/ingest.py \
        --conf conf/cluster.yaml --source /shared/images --output /shared/prepared

Arguments are those of ``dlpipe ingest``. The Spark master comes from spark-submit (or the
Databricks cluster), not from the config, unless ``--set spark.master=...`` says otherwise.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", "--set", "spark.master=null", *sys.argv[1:]]))
