"""The scoring table's Delta statements, read by Spark's own SQL parser (no Delta jars here)."""

from __future__ import annotations

import json

from pipelines.registry import ResolvedModel
from pipelines.score_table import PROBABILITIES_COMMENT, class_property, delta_class_statements
from pipelines.store import ScoringTable


def test_the_statements_parse_as_spark_sql_and_the_value_reads_back_as_json(spark) -> None:
    """Spark's own parser reads what is built (no Delta jars here: parsed, not run)."""
    model = ResolvedModel("models:/m/1", "m", "1")
    names = ["cat", "it's", 'say "hi"', "back\\slash", "café"]
    statements = delta_class_statements(ScoringTable("c.s.t", "delta"), model, names)
    parser = spark._jsparkSession.sessionState().sqlParser()
    plan = parser.parsePlan(statements[0])  # an UnresolvedTable + properties: not executed
    properties = plan.properties()
    value = properties.get(class_property(model)).get()
    assert json.loads(value) == names
    comment = parser.parsePlan(statements[1])
    assert PROBABILITIES_COMMENT in comment.toString()


def test_a_generated_batch_id_taken_by_a_run_in_the_same_second_moves_on(spark, tmp_path):
    from datetime import UTC, datetime

    from pipelines.batch_ids import resolve_batch_id
    from pipelines.score import _unused_batch_id

    table = ScoringTable(str(tmp_path / "scores"))
    now, _ = resolve_batch_id(None, datetime.now(tz=UTC))
    (tmp_path / "scores" / f"{ScoringTable.PARTITION_COLUMN}={now}").mkdir(parents=True)
    free = _unused_batch_id(spark, table, now)
    assert free > now  # a later second, still in the order the runs started
    assert _unused_batch_id(spark, table, free) == free
