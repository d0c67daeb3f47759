"""spark-dl-pipelines: distributed deep learning for images on Apache Spark."""
