"""What of a store URI or a setting may be recorded: no password, no secret."""

from __future__ import annotations

import pytest

from pipelines.tracking import REDACTED, redacted, shown_uri


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://dlpipe:s3cret-pw@mlflow.internal:5000", "http://dlpipe:***@mlflow.internal:5000"),
        (
            "postgresql://ml:s3cret-pw@db/mlflow?sslmode=require",
            "postgresql://ml:***@db/mlflow?sslmode=require",
        ),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://token-as-user@host/path", "https://token-as-user@host/path"),
        ("sqlite:////shared/work/mlflow.db", "sqlite:////shared/work/mlflow.db"),
        ("databricks-uc", "databricks-uc"),
        (None, None),
    ],
)
def test_a_uri_is_shown_without_its_password(uri, shown):
    assert shown_uri(uri) == shown


def test_params_are_recorded_without_secrets():
    params = {
        "spark.conf.spark.authenticate.secret": "0123abcd",
        "spark.conf.spark.hadoop.fs.s3a.access.key": "AKIA0000",
        "mlflow.tracking_uri": "http://u:pw-123456789@host:5000",
        "train.epochs": 3,
        "train.activation": "relu",
        "mlflow.registry_uri": None,
    }
    assert redacted(params) == {
        "spark.conf.spark.authenticate.secret": REDACTED,
        "spark.conf.spark.hadoop.fs.s3a.access.key": REDACTED,
        "mlflow.tracking_uri": "http://u:***@host:5000",
        "train.epochs": 3,
        "train.activation": "relu",
        "mlflow.registry_uri": None,
    }
