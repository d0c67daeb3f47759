"""The scoring table on Spark: one batch written, earlier ones read, the class order kept.

In: a :class:`~pipelines.store.ScoringTable` (where, and ``parquet`` or ``delta``) and the
rows of one batch. Out:

- :func:`write_batch`: the batch's partition replaced, and only it (Parquet's dynamic
  partition overwrite, Delta's ``replaceWhere``); columns added since earlier batches were
  written are merged into a Delta table's schema (``mergeSchema``);
- :func:`read_table`: every batch, older ones with the newer columns as null (Parquet is
  read with ``mergeSchema``), in the contract's column order;
- :func:`scored_identities`: the identity columns of what earlier batches scored without
  error, for the executors' anti-join of ``score.only_new`` (never collected on the driver);
- the class order of ``probabilities`` per model version, stored with the table: a
  ``_classes/<model>-v<version>.json`` side file beside a Parquet table, table properties
  (``dlpipe.classes.<model>.v<version>``) and a column comment on a Delta table, set through
  Spark SQL (:func:`delta_class_statements` builds them; they are pure so they are tested
  without a Delta writer).

Delta itself needs the Delta Lake jars (Databricks has them); the Parquet path runs anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING

from pipelines import schema
from pipelines.store import ScoringTable, exists, is_uri, write_atomic

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from pipelines.registry import ResolvedModel

#: Prefix of the Delta table properties holding a model version's class order.
CLASS_PROPERTY_PREFIX = "dlpipe.classes."

#: The comment a Delta table's ``probabilities`` column carries: where its class order is.
PROBABILITIES_COMMENT = (
    "class probabilities, in the order of the JSON list in table property "
    f"{CLASS_PROPERTY_PREFIX}<model_name>.v<model_version> (SHOW TBLPROPERTIES)"
)

#: Characters a batch id may hold: written into folder names and a replaceWhere predicate.
BATCH_ID = re.compile(r"[A-Za-z0-9._:+-]{1,128}")


def model_key(model: ResolvedModel) -> str:
    """How the class order of one model names it: ``<name>.v<version>``, else a URI digest."""
    if model.name and model.version:
        return f"{model.name}.v{model.version}"
    return "uri-" + hashlib.sha256(model.uri.encode()).hexdigest()[:16]


# --- writing --------------------------------------------------------------------------------


def write_batch(rows: DataFrame, table: ScoringTable, batch_id: str) -> None:
    """Replace batch ``batch_id`` of the table with ``rows``; every other batch stays.

    Raises:
        ValueError: ``batch_id`` holds characters other than :data:`BATCH_ID`'s (it goes
            into a partition folder's name and a SQL predicate).
    """
    writer = rows.write.mode("overwrite").partitionBy(ScoringTable.PARTITION_COLUMN)
    if table.format == "delta":
        writer = writer.format("delta").options(**delta_write_options(batch_id))
        if table.is_catalog_table:
            writer.saveAsTable(table.location)
        else:
            writer.save(table.location)
        return
    _check_batch_id(batch_id)
    # Parquet: Spark stages the new partition and swaps only it in; other batches stay.
    writer.option("partitionOverwriteMode", "dynamic").parquet(table.url)


def delta_write_options(batch_id: str) -> dict[str, str]:
    """The Delta writer's options for one batch (mode ``overwrite``, partitioned by batch).

    ``replaceWhere`` replaces exactly the rows of this batch, atomically; ``mergeSchema``
    lets the columns this version adds to the contract join an existing table's schema
    (older batches read them as null).

    Raises:
        ValueError: ``batch_id`` holds characters other than :data:`BATCH_ID`'s.
    """
    _check_batch_id(batch_id)
    return {
        "replaceWhere": f"{ScoringTable.PARTITION_COLUMN} = '{batch_id}'",
        "mergeSchema": "true",
    }


def _check_batch_id(batch_id: str) -> None:
    if not BATCH_ID.fullmatch(batch_id):
        raise ValueError(f"batch id {batch_id!r} does not match {BATCH_ID.pattern}")


def record_classes(
    spark: SparkSession, table: ScoringTable, model: ResolvedModel, label_names: list[str]
) -> str | None:
    """Store the class order of ``probabilities`` for ``model`` with the table.

    Parquet: ``_classes/<model>-v<version>.json`` beside the partitions (through Hadoop's
    file system for a URI, as Spark wrote the table). Delta: a table property per model
    version and the column comment (:func:`delta_class_statements`).

    Returns:
        Where it went: the side file, or ``TBLPROPERTIES <key>``; None for a model
        without classes.
    """
    if not label_names:
        return None
    if table.format == "delta":
        for statement in delta_class_statements(table, model, label_names):
            spark.sql(statement)
        return f"TBLPROPERTIES {class_property(model)}"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model.name or 'model'}-v{model.version or 'x'}")
    text = json.dumps({"model_uri": model.uri, "label_names": label_names}) + "\n"
    location = table.classes_file(stem)
    if is_uri(location):
        hadoop_path = spark.sparkContext._jvm.org.apache.hadoop.fs.Path(location)
        fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        stream = fs.create(hadoop_path, True)
        try:
            stream.write(bytearray(text.encode()))
        finally:
            stream.close()
        return location
    write_atomic(location, text)
    return location


def class_property(model: ResolvedModel) -> str:
    """The Delta table property holding ``model``'s class order."""
    return CLASS_PROPERTY_PREFIX + model_key(model)


def delta_identifier(table: ScoringTable) -> str:
    """The table as Spark SQL names it: ```cat`.`schema`.`name``` or ``delta.`<path>```."""
    if table.is_catalog_table:
        return ".".join(_quote_identifier(part) for part in table.location.split("."))
    return f"delta.{_quote_identifier(table.location)}"


def delta_class_statements(
    table: ScoringTable, model: ResolvedModel, label_names: list[str]
) -> list[str]:
    """The Spark SQL that stores ``model``'s class order with a Delta table.

    A table property per model version, ``dlpipe.classes.<name>.v<version>`` = the JSON list
    of class names (index ``i`` names ``probabilities[i]``), which ``SHOW TBLPROPERTIES``
    reads; and the comment of ``probabilities`` saying so. Run after the batch is written
    (the table exists then).
    """
    target = delta_identifier(table)
    names = json.dumps([str(name) for name in label_names], ensure_ascii=False)
    return [
        f"ALTER TABLE {target} SET TBLPROPERTIES "
        f"({_sql_string(class_property(model))} = {_sql_string(names)})",
        f"ALTER TABLE {target} ALTER COLUMN probabilities COMMENT "
        f"{_sql_string(PROBABILITIES_COMMENT)}",
    ]


def _quote_identifier(name: str) -> str:
    """A Spark SQL identifier in backticks (a backtick inside doubled)."""
    return "`" + name.replace("`", "``") + "`"


def _sql_string(text: str) -> str:
    """A Spark SQL string literal: backslashes and single quotes escaped with a backslash."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- reading --------------------------------------------------------------------------------


def table_exists(spark: SparkSession, table: ScoringTable) -> bool:
    """Whether the table has been written (a first batch makes it)."""
    if table.format == "delta" and table.is_catalog_table:
        return bool(spark.catalog.tableExists(table.location))
    if table.format == "delta":
        return exists(f"{table.location.rstrip('/')}/_delta_log")
    return exists(table.location)


def read_table(spark: SparkSession, table: str, fmt: str = "parquet") -> DataFrame:
    """The scoring table as a DataFrame, every batch, in the contract's column order.

    Batches written before a column was added read it as null (Parquet: ``mergeSchema``
    over every file's footer, which Spark does in a job on the executors).
    """
    where = ScoringTable(table, fmt)
    if fmt == "delta":
        frame = (
            spark.table(table) if where.is_catalog_table else spark.read.format("delta").load(table)
        )
    else:
        frame = spark.read.option("mergeSchema", "true").parquet(where.url)
    known = [name for name in schema.SCORING_TABLE if name in frame.columns]
    return frame.select(*known, *(c for c in frame.columns if c not in known))


def batch_exists(spark: SparkSession, table: ScoringTable, batch_id: str) -> bool:
    """Whether the table holds a batch ``batch_id`` (a partition folder, or a row)."""
    from pyspark.sql import functions as F

    folder = table.local_partition(batch_id)
    if folder is not None:
        return folder.is_dir()
    if not table_exists(spark, table):
        return False
    frame = read_table(spark, table.location, table.format)
    return bool(frame.where(F.col(ScoringTable.PARTITION_COLUMN) == batch_id).limit(1).count())


def scored_identities(
    spark: SparkSession,
    table: ScoringTable,
    *,
    batch_id: str,
    model: Column,
) -> DataFrame | None:
    """The identity columns of every row earlier batches scored without error.

    Only rows with an identity count (batches written before the identity columns read them
    as null), of the model ``model`` selects, outside the batch being rewritten (re-running
    a batch must score what that batch held again). The frame stays on the executors.

    Args:
        spark: The session.
        table: The scoring table.
        batch_id: The batch being (re)written.
        model: A condition on the table's provenance columns (which model's rows count).

    Returns:
        ``path`` and :data:`~pipelines.schema.FILE_IDENTITY`, or None when the table does
        not exist yet.
    """
    from pyspark.sql import functions as F

    if not table_exists(spark, table):
        return None
    frame = read_table(spark, table.location, table.format)
    missing = [name for name in schema.FILE_IDENTITY if name not in frame.columns]
    if missing:  # only batches from before the identity columns: nothing counts as scored
        return None
    return frame.where(
        F.col("error").isNull()
        & F.col("file_size").isNotNull()
        & (F.col(ScoringTable.PARTITION_COLUMN) != batch_id)
        & model
    ).select(schema.PATH, *schema.FILE_IDENTITY)
