"""Which earlier versions a registration waits for, on a real local MLflow registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipelines import registry
from pipelines.store import Owner


@pytest.fixture()
def client(tmp_path: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")
    return client


def _version(client: mlflow.MlflowClient, owner: Owner | None) -> str:
    tags = {registry.DECIDING_TAG: owner.to_json()} if owner else {}
    return client.create_model_version("m", "file:///nowhere", tags=tags).version


def test_a_live_or_unknowable_decider_is_waited_for_a_dead_or_stale_one_not(
    client, monkeypatch
) -> None:
    elsewhere = Owner("another-host", 1234, 1.0, 1.0)  # alive() cannot tell: None
    gone = Owner(Owner.me().host, 2**22 + 7, 1.0, None)  # no such process here
    _version(client, elsewhere)  # v1
    _version(client, gone)  # v2
    _version(client, None)  # v3: decided already
    _version(client, Owner.me())  # v4: this process, deciding
    assert registry._earlier_deciders(client, "m", 5) == ["1", "4"]
    assert registry._earlier_deciders(client, "m", 4) == ["1"]
    # A tag older than the longest wait is a leftover of a lost host: never waited for.
    monkeypatch.setattr(registry, "DECISION_WAIT_S", -60.0)
    assert registry._earlier_deciders(client, "m", 5) == []
