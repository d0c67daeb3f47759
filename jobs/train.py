"""spark-submit / Databricks entry point of the training stage.

    spark-submit --master spark://HOST:7077 jobs/train.py \
        --conf conf/cluster.yaml --dataset /shared/prepared

Arguments are those of ``dlpipe train``. The Spark master comes from spark-submit (or the
Databricks cluster); ``train.num_proc`` ranks need as many executor task slots.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--set", "spark.master=null", *sys.argv[1:]]))
