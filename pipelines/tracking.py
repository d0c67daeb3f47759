"""MLflow set-up in one place: which stores the process talks to, and the client for them.

In: a tracking URI and, where the registry is elsewhere (``databricks-uc``), a registry URI,
usually from :class:`pipelines.store.Store`. Out: MLflow's fluent API pointed at them
(:func:`use_stores`, or :func:`pointed_at` for one block), :func:`client` for the same
stores, and :func:`use_experiment`. No other module calls ``mlflow.set_tracking_uri``,
``mlflow.set_registry_uri`` or builds an ``MlflowClient``. MLflow is imported inside the
functions (importing this module is cheap). Also what may be recorded or shown of a store or
a setting: :func:`shown_uri` and :func:`redacted` keep passwords and secrets out of params,
results, logs and pages (credentials belong in ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``, or a token, never in the config).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipelines.store import Store


def client(tracking_uri: str | None = None, registry_uri: str | None = None) -> MlflowClient:
    """An MLflow client for the given stores (None: the ones the fluent API points at)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)


#: What MLflow reads from the environment to reach (and log in to) a tracking server.
CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "DATABRICKS_HOST",
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_ID",
    "DATABRICKS_CLIENT_SECRET",
)


def rank_environment(tracking_uri: str) -> dict[str, str]:
    """What a training rank needs in its environment to log to the tracking server.

    The tracking URI, and the credentials this process has in its own environment. On a
    Databricks driver, where the credentials come from the runtime's context rather than
    the environment, MLflow's own lookup supplies the workspace's host and a token (as
    Databricks documents for logging from workers). Nothing comes from the config file.
    The values travel to the ranks with the launch; never log them.
    """
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    env.update({name: os.environ[name] for name in CREDENTIAL_VARIABLES if name in os.environ})
    if tracking_uri.startswith("databricks") and not (
        "DATABRICKS_TOKEN" in env or "DATABRICKS_CLIENT_SECRET" in env
    ):
        try:
            from mlflow.utils.databricks_utils import get_databricks_host_creds

            creds = get_databricks_host_creds(tracking_uri)
        except Exception:  # noqa: BLE001 - not on Databricks: the ranks go without
            return env
        if creds.host:
            env["DATABRICKS_HOST"] = creds.host
        if creds.token:
            env["DATABRICKS_TOKEN"] = creds.token
    return env


def use_stores(tracking_uri: str | None, registry_uri: str | None = None) -> None:
    """Point MLflow's fluent API at the tracking store and, when given, a separate registry.

    Args:
        tracking_uri: Tracking URI (None: leave MLflow's as it is).
        registry_uri: Registry URI when it is not the tracking store's, e.g.
            ``databricks-uc`` (None: MLflow's default, the tracking store).
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if registry_uri:
        mlflow.set_registry_uri(registry_uri)


@contextlib.contextmanager
def pointed_at(tracking_uri: str, registry_uri: str | None = None) -> Iterator[None]:
    """Point the fluent API at the stores for a block, then restore them (and their env vars).

    For library calls that only exist in the fluent form (``mlflow.register_model``), made on
    behalf of a caller whose own MLflow set-up must not change.
    """
    with _tracking_uri(tracking_uri), _registry_uri(registry_uri):
        yield


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    if previous == uri:
        yield
        return
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


@contextlib.contextmanager
def _registry_uri(uri: str | None) -> Iterator[None]:
    import mlflow

    if uri is None:
        yield
        return
    # set_registry_uri also exports MLFLOW_REGISTRY_URI: restore the variable and, through
    # it, what the next lookup resolves to.
    env_before = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_registry_uri(env_before)  # None unsets it
        if env_before is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def use_experiment(store: Store, name: str) -> str:
    """Point the fluent API at the store's MLflow stores and experiment ``name``; return its id.

    The experiment is created if needed. With a local sqlite store MLflow would put
    artifacts in ``./mlruns`` of whatever directory the job started in; an experiment
    created here keeps them in the work directory (:attr:`Store.artifacts`) instead.
    """
    import mlflow

    use_stores(store.tracking_uri, store.registry_uri)
    if store.local_store:
        experiment_id(store, name)
    return mlflow.set_experiment(name).experiment_id


#: Names of settings whose values are secret: Spark's own ``spark.redaction.regex`` default.
_SECRET_NAME = re.compile(r"(?i)secret|password|token|access[.]key")
#: What a secret value is recorded as (Spark's own mark).
REDACTED = "*********(redacted)"


def shown_uri(uri: str | None) -> str | None:
    """``uri`` as it may be printed, logged or recorded: a password in it replaced by ``***``.

    A store URI may carry one (``postgresql://user:pw@host/db``, ``http://user:pw@host``);
    the URI that connects keeps it, every copy shown or recorded does not.
    """
    if not uri or "@" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    user, host = parts.netloc.rpartition("@")[0].partition(":")[0], parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def redacted(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` safe to record: secret-named settings masked, URI passwords removed.

    E.g. ``spark.conf.spark.authenticate.secret`` (better given to spark-submit than to
    the config) or a tracking URI with a password in it.
    """
    return {
        key: REDACTED
        if _SECRET_NAME.search(key)
        else shown_uri(value)
        if isinstance(value, str)
        else value
        for key, value in params.items()
    }


def open_store(store: Store) -> MlflowClient:
    """A client of the store's tracking server, whose tables MLflow created or checked.

    MLflow creates (migrates) a new sqlite store when a client first opens it, and two
    processes doing that at once crash: a local store is opened under its file lock.
    """
    if store.local_store:
        with store.local_store_lock():
            return client(store.tracking_uri)
    return client(store.tracking_uri)


def experiment_id(store: Store, name: str) -> str:
    """The id of experiment ``name`` in the store's tracking server, created if needed.

    Leaves the fluent API as it is. In the local sqlite store a new experiment keeps its
    artifacts in the work directory (:attr:`Store.artifacts`), as :func:`use_experiment`'s.
    """
    from mlflow.exceptions import MlflowException

    tracking = open_store(store)
    found = tracking.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = store.artifacts.as_uri() if store.local_store else None
    try:
        return tracking.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        found = tracking.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
