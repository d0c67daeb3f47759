"""A scoring batch from data alone: its id, its top classes, its summary, Delta's class order."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pipelines.batch_ids import BatchIdError, resolve_batch_id
from pipelines.batch_summary import ClassGroup, _groups_of_frame, summarize, total_variation
from pipelines.registry import ResolvedModel
from pipelines.score import top_classes
from pipelines.score_table import (
    BATCH_ID,
    PROBABILITIES_COMMENT,
    class_property,
    delta_class_statements,
    delta_identifier,
    delta_write_options,
)
from pipelines.store import ScoringTable

NIGHT = datetime(2026, 11, 22, 2, 0, 5, tzinfo=UTC)


def test_without_a_batch_id_the_id_is_the_runs_utc_date_time_and_generated() -> None:
    assert resolve_batch_id(None, NIGHT) == ("20261122T020005Z", True)
    # A local time is turned into UTC; a naive one is taken as UTC.
    paris = NIGHT.astimezone(timezone(timedelta(hours=1)))
    assert resolve_batch_id(None, paris)[0] == "20261122T020005Z"
    assert resolve_batch_id(None, NIGHT.replace(tzinfo=None))[0] == "20261122T020005Z"


def test_generated_ids_sort_as_the_runs_started_and_are_partition_safe() -> None:
    times = [NIGHT + timedelta(seconds=s) for s in (0, 1, 59, 3600, 86400 * 40, 86400 * 400)]
    ids = [resolve_batch_id(None, t)[0] for t in times]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(BATCH_ID.fullmatch(i) and set(i) <= set("0123456789TZ") for i in ids)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("nightly-{date}", "nightly-2026-11-22"),
        ("{datetime}", "20261122T020005Z"),
        ("{date}.{datetime}", "2026-11-22.20261122T020005Z"),
        ("2026-11-22", "2026-11-22"),  # what Databricks passes for {{job.trigger.time.iso_date}}
        ("2026-11-22T10:00", "2026-11-22T10:00"),
    ],
)
def test_a_given_batch_id_or_template_is_taken_as_asked(given: str, expected: str) -> None:
    assert resolve_batch_id(given, NIGHT) == (expected, False)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("{week}", "unknown placeholder {week} (known: {date}, {datetime})"),
        ("{}", "unknown placeholder {}"),
        ("{date:%Y}", "--batch-id '{date:%Y}'"),
        ("{{job.trigger.time.iso_date}}", "a Databricks dynamic value reference"),
        ("a/b", "must be 1 to 128 letters, digits"),
        ("x' OR '1'='1", "must be 1 to 128 letters, digits"),
        ("", "must be 1 to 128 letters, digits"),
        ("{date", "--batch-id '{date'"),
    ],
)
def test_a_batch_id_that_cannot_name_a_partition_is_a_one_line_error(
    given: str, message: str
) -> None:
    with pytest.raises(BatchIdError) as info:
        resolve_batch_id(given, NIGHT)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_top_classes_name_the_most_probable_first_ties_in_class_order() -> None:
    names = ["cat", "dog", "emu", "fox"]
    rows = [[0.1, 0.6, 0.2, 0.1], None, [0.25, 0.25, 0.25, 0.25]]
    top = top_classes(rows, names, 3)
    assert top["top_labels"] == [["dog", "emu", "cat"], None, ["cat", "dog", "emu"]]
    assert top["top_probabilities"] == [[0.6, 0.2, 0.1], None, [0.25, 0.25, 0.25]]
    assert top_classes(rows, names, 10)["top_labels"][0] == ["dog", "emu", "cat", "fox"]
    none = [None] * 3
    assert top_classes(rows, names, 0) == {"top_labels": none, "top_probabilities": none}
    assert top_classes(rows, [], 3)["top_labels"] == [None] * 3  # a model without classes


def test_total_variation_is_half_the_l1_distance_of_the_shares() -> None:
    assert total_variation({"a": 5, "b": 5}, {"a": 50, "b": 50}) == 0
    assert total_variation({"a": 10}, {"b": 3}) == 1
    assert total_variation({"a": 3, "b": 1}, {"a": 1, "b": 1}) == pytest.approx(0.25)
    assert total_variation({"a": 1, "c": 1}, {"a": 1, "b": 1}) == pytest.approx(0.5)
    assert total_variation({}, {"a": 1}) is None and total_variation({"a": 1}, {}) is None


def test_a_batch_summary_adds_up_its_groups() -> None:
    groups = [
        ClassGroup("cat", rows=6, probabilities=6, probability_sum=5.4, low=1),
        ClassGroup("dog", rows=2, probabilities=2, probability_sum=0.8, low=2),
        ClassGroup("cat", rows=2, probabilities=2, probability_sum=1.8, low=0),  # another file
        ClassGroup(None, rows=3, errors=3),
    ]
    summary = summarize(groups, {"cat": 50, "dog": 40, "emu": 10}, 0.5, ["a note"])
    assert (summary.rows, summary.scored, summary.errors) == (13, 10, 3)
    assert summary.mean_probability == pytest.approx(8.0 / 10)
    assert summary.low_confidence_share == pytest.approx(3 / 10)
    assert summary.predicted_classes == {"cat": 8, "dog": 2, "emu": 0}
    # shares 0.8/0.2/0 against 0.5/0.4/0.1
    assert summary.class_tvd == pytest.approx(0.5 * (0.3 + 0.2 + 0.1))
    assert summary.notes == ["a note"] and summary.mean_reconstruction_error is None
    json.dumps(summary.to_dict())  # what --json prints


def test_a_summary_of_nothing_or_of_a_model_without_classes_has_no_shares() -> None:
    empty = summarize([], {"cat": 1}, 0.5)
    assert (empty.rows, empty.mean_probability, empty.class_tvd) == (0, None, None)
    assert empty.predicted_classes == {"cat": 0}
    ae = summarize([ClassGroup(None, rows=4, reconstructions=4, reconstruction_sum=0.2)], {}, 0.5)
    assert ae.mean_reconstruction_error == pytest.approx(0.05)
    assert (ae.scored, ae.class_tvd, ae.low_confidence_share) == (4, None, None)


def test_groups_of_a_frame_count_errors_and_low_confidence_per_label() -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "predicted_label": ["a", "a", "b", None],
            "error": [None, None, None, "corrupt image"],
            "probability": [0.9, 0.4, 0.5, None],
        }
    )
    groups = {g.label: g for g in _groups_of_frame(frame, 0.5)}
    assert (groups["a"].rows, groups["a"].low, groups["a"].probability_sum) == (2, 1, 1.3)
    assert (groups["b"].low, groups[None].errors, groups[None].probabilities) == (0, 1, 0)
    assert not math.isnan(summarize(groups.values(), {}, 0.5).mean_probability)


def test_delta_keeps_the_class_order_as_a_table_property_and_a_column_comment() -> None:
    model = ResolvedModel("models:/main.dlpipe.images/3", "main.dlpipe.images", "3")
    table = ScoringTable("main.dlpipe.scores", "delta")
    names = ["cat", "it's", "back\\slash", "café"]
    statements = delta_class_statements(table, model, names)
    assert delta_identifier(table) == "`main`.`dlpipe`.`scores`"
    assert class_property(model) == "dlpipe.classes.main.dlpipe.images.v3"
    assert statements == [
        "ALTER TABLE `main`.`dlpipe`.`scores` SET TBLPROPERTIES "
        "('dlpipe.classes.main.dlpipe.images.v3' = "
        """'["cat", "it\\'s", "back\\\\\\\\slash", "café"]')""",
        "ALTER TABLE `main`.`dlpipe`.`scores` ALTER COLUMN probabilities COMMENT "
        f"'{PROBABILITIES_COMMENT}'",
    ]
    path = ScoringTable("/Volumes/main/dlpipe/files/scores", "delta")
    assert delta_identifier(path) == "delta.`/Volumes/main/dlpipe/files/scores`"
    other = ResolvedModel("runs:/abc/model", None, None)
    assert class_property(other).startswith("dlpipe.classes.uri-")


def test_delta_replaces_exactly_one_batch_and_merges_new_columns() -> None:
    assert delta_write_options("2026-11-22") == {
        "replaceWhere": "batch_id = '2026-11-22'",
        "mergeSchema": "true",
    }
    with pytest.raises(ValueError, match="does not match"):
        delta_write_options("x' OR batch_id <> 'y")  # never a predicate of more batches
