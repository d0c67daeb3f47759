"""Training: the driver side (MLflow run, launch, register) and the worker side (shard, fit)."""
