"""Model registry: register a logged model, move the champion alias only when it is better.

In: the URI of a logged model (``models:/m-...`` from :func:`pipelines.image_model.log_image_model`,
or ``runs:/<run_id>/model``), the id of the run that logged it, the metric to judge by and,
from the training stage, a *challenge*: the current champion evaluated on the new run's
test split, so that both models are compared on one split. Out: a :class:`Registration`
saying which version was created and whether the alias moved, with the decision, both
scores and the evidence (the split's digest) recorded as tags on the model version and on
the run. :func:`decide` is the rule itself, from numbers alone.

Deployment moves an alias, it never retrains: scoring and serving ask for
``models:/<name>@<alias>``, which :func:`resolve_model_uri` pins to a concrete version.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.store import Owner

log = logging.getLogger(__name__)

#: Tag on the model version: the one-line promotion decision.
DECISION_TAG = "promotion_decision"
#: Tags on the model version: what the decision compared.
METRIC_TAG = "promotion_metric"
SCORE_TAG = "promotion_score"
CHAMPION_VERSION_TAG = "promotion_champion_version"
CHAMPION_SCORE_TAG = "promotion_champion_score"
MIN_IMPROVEMENT_TAG = "promotion_min_improvement"
COMPARABLE_TAG = "promotion_comparable"
#: Tag on a version that took the alias: the version that held it before (for a rollback).
PREVIOUS_CHAMPION_TAG = "previous_champion"
#: Tags on a version that took the alias: who moved it, when (and, by hand, why).
PROMOTED_BY_TAG = "promoted_by"
PROMOTED_AT_TAG = "promoted_at"
#: Tags on the training run.
RUN_DECISION_TAG = "registry.decision"
RUN_VERSION_TAG = "registry.version"
RUN_MODEL_TAG = "registry.model_name"
RUN_PROMOTED_TAG = "registry.promoted"

#: Tag a version is created with while its process decides the alias: the process's
#: owner (host, pid, start), removed once the decision is recorded.
DECIDING_TAG = "promotion_deciding"

#: Seconds to wait for a new model version to become READY.
READY_TIMEOUT_S = 300.0
#: Seconds a version waits for earlier versions' decisions by live processes (a champion
#: challenge evaluates a model: minutes at most); past it, it decides anyway (a warning).
DECISION_WAIT_S = 900.0

_HINT = "train one with 'dlpipe train' or pass --model"


class ModelNotFoundError(UserError):
    """A registered model, alias or version does not exist; the message names it."""


class MissingMetricError(UserError):
    """The run to be registered has not logged the metric that decides promotion."""


class RegistrationError(UserError):
    """A new model version did not become READY."""


@dataclass(frozen=True)
class Registration:
    """Outcome of :func:`register_and_promote`.

    Attributes:
        model_name: Registered model name.
        version: The version just created.
        model_uri: ``models:/<name>/<version>`` of that version.
        alias: The alias that was considered.
        promoted: Whether the alias now points to the new version.
        decision: One line, e.g. ``promoted: test_accuracy 0.991 > champion v3 0.985``.
        champion_version: The version holding the alias after the decision.
        score: The new version's metric.
        champion_score: The previous champion's on the same split (None: none, or not
            comparable).
        previous_champion: The version that held the alias before (None: none did).
    """

    model_name: str
    version: str
    model_uri: str
    alias: str
    promoted: bool
    decision: str
    champion_version: str
    score: float | None = None
    champion_score: float | None = None
    previous_champion: str | None = None


@dataclass(frozen=True)
class ChampionScore:
    """The champion, evaluated on the new version's split (what a challenge returns).

    Attributes:
        value: Its metric on that split; None when it could not be evaluated there.
        reason: Why it could not (other classes, input shape or task; files gone).
    """

    value: float | None
    reason: str = ""

    @property
    def comparable(self) -> bool:
        """Whether the champion was evaluated on the split."""
        return self.value is not None


#: Evaluates the champion (a model version) on the new version's split.
Challenge = Callable[[ModelVersion], ChampionScore]


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI pinned to what it names.

    Attributes:
        uri: ``models:/<name>/<version>`` for a registry URI; anything else as given.
        name: Registered model name, or None outside the registry.
        version: Concrete version, or None outside the registry.
    """

    uri: str
    name: str | None
    version: str | None


def register_and_promote(
    model_uri: str,
    run_id: str,
    *,
    model_name: str,
    alias: str,
    metric: str,
    higher_is_better: bool,
    tracking_uri: str,
    registry_uri: str | None = None,
    challenge: Challenge | None = None,
    min_improvement: float = 0.0,
    incomparable: str = "promote",
    evidence: Mapping[str, str] | None = None,
) -> Registration:
    """Register ``model_uri`` as a new version and move ``alias`` to it if it is better.

    The new version's ``metric`` (from run ``run_id``) is compared with the champion's: as
    ``challenge`` evaluates it on the same split (the training stage passes one), else as
    the champion's own run logged it (a different split once the data changed). The alias
    moves when :func:`decide` says so, or when no version holds it. A champion the
    challenge cannot evaluate is not comparable: ``incomparable`` (``promote`` or
    ``keep``) decides. The decision, both scores and ``evidence`` (e.g. the split's digest)
    are tagged on the version; the decision on the run too.

    Concurrent trainings of one model decide one after the other, in version order
    (:func:`_wait_for_earlier_decisions`): each against the alias as the one before left
    it, so the alias ends on the better version, never on whichever wrote last.

    Args:
        model_uri: The logged model, e.g. ``ModelInfo.model_uri``.
        run_id: The run that logged it and holds ``metric``.
        model_name: Registered model name (created if it does not exist).
        alias: The alias to move, e.g. ``champion``.
        metric: Metric name, e.g. ``test_accuracy``.
        higher_is_better: False for losses and errors.
        tracking_uri: Tracking (and, unless configured otherwise, registry) URI.
        registry_uri: Registry URI when it differs from the tracking store's, e.g.
            ``databricks-uc``; None keeps MLflow's default.
        challenge: Evaluates the champion on the new version's split.
        min_improvement: How much better the new version must be (``registry.min_improvement``).
        incomparable: ``promote`` or ``keep`` when the champion is not comparable.
        evidence: More tags for the new version (``promotion_split_sha256``, ...).

    Returns:
        What was registered and decided.

    Raises:
        MissingMetricError: Run ``run_id`` has no ``metric`` (checked before registering).
        RegistrationError: The version did not become READY in time.

    """
    client = tracking.client(tracking_uri, registry_uri)
    metrics = client.get_run(run_id).data.metrics
    if metric not in metrics:
        logged = ", ".join(sorted(metrics)) or "none"
        raise MissingMetricError(
            f"run {run_id} has no metric {metric!r} to decide promotion by "
            f"(logged metrics: {logged}); evaluate the model before registering it"
        )
    value = float(metrics[metric])

    with tracking.pointed_at(tracking_uri, registry_uri):
        # Created with its "deciding" tag in one call: a later version cannot miss it.
        created = mlflow.register_model(
            model_uri, model_name, tags={DECIDING_TAG: Owner.me().to_json()}
        )
    version = str(created.version)
    try:
        version = _wait_until_ready(client, model_name, version)
        _wait_for_earlier_decisions(client, model_name, version)
        return _decide_and_record(
            client, model_name, version, run_id, alias, metric, value, higher_is_better,
            challenge, min_improvement, incomparable, evidence,
        )  # fmt: skip
    finally:
        client.delete_model_version_tag(model_name, version, DECIDING_TAG)


def _decide_and_record(
    client: MlflowClient,
    model_name: str,
    version: str,
    run_id: str,
    alias: str,
    metric: str,
    value: float,
    higher_is_better: bool,
    challenge: Challenge | None,
    min_improvement: float,
    incomparable: str,
    evidence: Mapping[str, str] | None,
) -> Registration:
    """Decide against the alias's holder now, move the alias if so, record it all in tags."""
    champion = _alias_holder(client, model_name, alias)
    champion_score: float | None = None
    if champion is None:
        promoted, decision = True, "promoted: no champion yet"
    else:
        name = f"champion v{champion.version}"
        if challenge is not None:
            scored = challenge(champion)
            champion_score = scored.value
        else:  # the champion's own logged metric: a different split once the data changed
            scored = ChampionScore(_run_metric(client, champion.run_id, metric))
            champion_score = scored.value
            if not scored.comparable:
                scored = ChampionScore(None, f"its run has no {metric}")
        if scored.comparable:
            promoted, decision = decide(
                value,
                champion_score,
                metric=metric,
                champion=name,
                higher_is_better=higher_is_better,
                min_improvement=min_improvement,
            )
        else:
            promoted, decision = decide_incomparable(name, scored.reason, incomparable)
    if promoted:
        client.set_registered_model_alias(model_name, alias, version)
    champion_version = version if promoted else str(champion.version)  # type: ignore[union-attr]

    tags = {
        DECISION_TAG: decision,
        METRIC_TAG: metric,
        SCORE_TAG: repr(value),
        MIN_IMPROVEMENT_TAG: repr(float(min_improvement)),
        **dict(evidence or {}),
    }
    if champion is not None:
        tags[CHAMPION_VERSION_TAG] = str(champion.version)
        tags[COMPARABLE_TAG] = str(champion_score is not None).lower()
        if champion_score is not None:
            tags[CHAMPION_SCORE_TAG] = repr(champion_score)
    if promoted:
        tags[PROMOTED_BY_TAG] = f"dlpipe train (run {run_id})"
        tags[PROMOTED_AT_TAG] = _now()
        if champion is not None:
            tags[PREVIOUS_CHAMPION_TAG] = str(champion.version)
    for key, tag in tags.items():
        client.set_model_version_tag(model_name, version, key, tag)
    client.set_tag(run_id, RUN_DECISION_TAG, decision)
    client.set_tag(run_id, RUN_VERSION_TAG, version)
    client.set_tag(run_id, RUN_MODEL_TAG, model_name)
    client.set_tag(run_id, RUN_PROMOTED_TAG, str(promoted).lower())
    return Registration(
        model_name=model_name,
        version=version,
        model_uri=f"models:/{model_name}/{version}",
        alias=alias,
        promoted=promoted,
        decision=decision,
        champion_version=champion_version,
        score=value,
        champion_score=champion_score,
        previous_champion=str(champion.version) if champion is not None else None,
    )


def resolve_model_uri(
    uri: str | None,
    *,
    model_name: str,
    alias: str,
    tracking_uri: str,
    registry_uri: str | None = None,
) -> ResolvedModel:
    """Pin a model URI to a concrete registered version, or pass a non-registry URI through.

    Args:
        uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/<name>/latest``,
            or any other MLflow model URI (``runs:/...``, ``models:/m-<id>``, a path, ``file:``,
            ``s3://``, ...), which is returned as it is. None means
            ``models:/<model_name>@<alias>``.
        model_name: Registered model name used when ``uri`` is None.
        alias: Alias used when ``uri`` is None.
        tracking_uri: Tracking (and, unless configured otherwise, registry) URI.
        registry_uri: Registry URI when it differs from the tracking store's, e.g.
            ``databricks-uc``; None keeps MLflow's default.

    Returns:
        The pinned URI with its name and version (both None for a non-registry URI).

    Raises:
        ModelNotFoundError: The registered model, alias or version does not exist.

    """
    target = uri or f"models:/{model_name}@{alias}"
    parsed = _parse_registry_uri(target)
    if parsed is None:
        return ResolvedModel(uri=target, name=None, version=None)
    name, selector, is_alias = parsed
    client = tracking.client(tracking_uri, registry_uri)
    _require_registered_model(client, name, registry_uri or tracking_uri)
    if is_alias:
        holder = _alias_holder(client, name, selector)
        if holder is None:
            raise ModelNotFoundError(
                f"no model version with alias {selector} for registered model {name}; {_HINT}"
            )
        version = str(holder.version)
    elif selector.lower() == "latest":
        versions = client.search_model_versions(f"name = '{_quote(name)}'")
        if not versions:
            raise ModelNotFoundError(f"registered model {name} has no versions; {_HINT}")
        version = str(max(int(v.version) for v in versions))
    else:
        if not selector.isdigit():
            raise ModelNotFoundError(
                f"model URI {target} names neither a version number nor an alias; "
                f"use models:/{name}/<version> or models:/{name}@<alias>"
            )
        try:
            version = str(client.get_model_version(name, selector).version)
        except MlflowException as exc:
            if not _is_not_found(exc):
                raise
            raise ModelNotFoundError(
                f"registered model {name} has no version {selector}; {_HINT}"
            ) from None
    return ResolvedModel(uri=f"models:/{name}/{version}", name=name, version=version)


def download_model(
    model: ResolvedModel, cache: Path, tracking_uri: str, registry_uri: str | None = None
) -> Path:
    """The model's files on this machine, downloaded once per model version into ``cache``.

    A registered version (or a run's artifact) never changes, so a copy made once serves
    every later job, and its folder name identifies it (to scoring's executors too). Each
    download has its own staging folder; of concurrent ones, the first published stays.
    """
    import hashlib
    import re
    import tempfile

    from pipelines.store import publish_dir_once, remove

    key = f"{model.name}-v{model.version}" if model.name and model.version else model.uri
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-")[:80]
    name += "-" + hashlib.sha256(model.uri.encode()).hexdigest()[:8]
    target = cache / name
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            with tracking.pointed_at(tracking_uri, registry_uri):
                downloaded = mlflow.artifacts.download_artifacts(model.uri, dst_path=str(staging))
            # Another job may have downloaded the same version meanwhile: keep the first.
            publish_dir_once(downloaded, target)
        finally:
            remove(staging)
    return target


def _parse_registry_uri(uri: str) -> tuple[str, str, bool] | None:
    """Split ``models:/name@alias`` or ``models:/name/version``; None for other URIs.

    A ``models:/<id>`` URI with no ``/`` or ``@`` after the prefix is a logged model (MLflow 3),
    not a registry entry.
    """
    prefix = "models:/"
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix) :].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias and "/" not in alias:
            return name, alias, True
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if name and version:
            return name, version, False
    return None


def _require_registered_model(client: MlflowClient, name: str, registry: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        raise ModelNotFoundError(
            f"registered model {name} not found in the registry of {registry}; {_HINT}"
        ) from None


def _alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """Return the version ``alias`` points to, or None when no version holds it."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        # The sqlite/SQL store reports a missing alias as INVALID_PARAMETER_VALUE.
        missing_alias = exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)
        if _is_not_found(exc) or missing_alias:
            return None
        raise


def decide(
    value: float,
    previous: float | None,
    *,
    metric: str,
    champion: str,
    higher_is_better: bool,
    min_improvement: float = 0.0,
) -> tuple[bool, str]:
    """Whether a new model beats the champion on ``metric``; (promote?, one-line reason).

    The new model must be strictly better, and better by at least ``min_improvement`` (in
    the metric's units; a hair of floating-point rounding is forgiven).

    Args:
        value: The new model's metric (NaN never promotes).
        previous: The champion's on the same split; None (unknown) promotes.
        metric: The metric's name, for the reason.
        champion: How the reason names the champion, e.g. ``champion v3``.
        higher_is_better: False for losses and errors.
        min_improvement: The least improvement that promotes (``registry.min_improvement``).
    """
    if previous is None:
        return True, f"promoted: {champion} has no {metric}"
    if math.isnan(value):
        return False, f"kept {champion}: {metric} is NaN"
    gain = value - previous if higher_is_better else previous - value
    better, worse = (">", "<=") if higher_is_better else ("<", ">=")
    if gain > 0 and gain >= min_improvement - 1e-12:
        reason = f"promoted: {metric} {value:.6g} {better} {champion} {previous:.6g}"
        if min_improvement > 0:
            reason += f" (by {gain:.6g} >= min_improvement {min_improvement:g})"
        return True, reason
    if gain > 0:
        return False, (
            f"kept {champion}: {metric} {value:.6g} beats {previous:.6g} by only {gain:.6g} "
            f"< min_improvement {min_improvement:g}"
        )
    return False, f"kept {champion}: {metric} {value:.6g} {worse} {previous:.6g}"


def decide_incomparable(champion: str, reason: str, rule: str) -> tuple[bool, str]:
    """The decision when the champion cannot be evaluated on the new split.

    Args:
        champion: How the reason names the champion, e.g. ``champion v3``.
        reason: Why it cannot (other classes, input shape or task; its files gone).
        rule: ``registry.incomparable``: ``promote`` (the new version answers the dataset
            as it is now) or ``keep`` (the champion stays until a person decides).
    """
    if rule == "keep":
        return False, f"kept {champion}: not comparable ({reason}); registry.incomparable=keep"
    return True, f"promoted: {champion} is not comparable ({reason}); registry.incomparable=promote"


def _now() -> str:
    """The time now, UTC, ISO 8601 to the second."""
    from datetime import UTC, datetime

    return datetime.now(tz=UTC).isoformat(timespec="seconds")


def _run_metric(client: MlflowClient, run_id: str | None, metric: str) -> float | None:
    """Return ``metric`` of run ``run_id``; None if the run or the metric is gone, or NaN."""
    if not run_id:
        return None
    try:
        value = client.get_run(run_id).data.metrics.get(metric)
    except MlflowException as exc:
        if _is_not_found(exc):
            return None
        raise
    if value is None or math.isnan(value):
        return None
    return float(value)


def _wait_for_earlier_decisions(client: MlflowClient, name: str, version: str) -> None:
    """Wait until every earlier version of ``name`` still deciding the alias has decided.

    The registry numbers versions atomically, so its numbers order the alias decisions:
    version N decides only after every version below N created by a live ``dlpipe
    train`` (tagged :data:`DECIDING_TAG` at creation, untagged once its decision is
    recorded) has decided. Two trainings registering at the same moment thus decide one
    after the other, the later against the alias as the earlier left it, and the alias
    ends on the better of them. A version whose process is gone (killed) is not waited
    for; one on another host is waited for up to :data:`DECISION_WAIT_S`.
    """
    deadline = time.monotonic() + DECISION_WAIT_S
    delay = 0.1
    while True:
        waiting = _earlier_deciders(client, name, int(version))
        if not waiting:
            return
        if time.monotonic() > deadline:
            log.warning(
                "registry: %s v%s decides without waiting longer for v%s (still deciding "
                "after %.0f s)", name, version, ", v".join(waiting), DECISION_WAIT_S,
            )  # fmt: skip
            return
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _earlier_deciders(client: MlflowClient, name: str, version: int) -> list[str]:
    """Versions below ``version`` whose live (or unknowable) process is deciding the alias.

    A tag older than :data:`DECISION_WAIT_S` is a leftover (its host was lost between the
    registration and the decision): no later training waits for it again.
    """
    waiting = []
    recent_ms = (time.time() - DECISION_WAIT_S) * 1000
    for candidate in client.search_model_versions(f"name='{_quote(name)}'"):
        number = int(candidate.version)
        owner_text = (candidate.tags or {}).get(DECIDING_TAG)
        if number >= version or not owner_text:
            continue
        if (candidate.creation_timestamp or 0) < recent_ms:
            continue
        try:
            owner = Owner.from_json(owner_text)
        except ValueError:
            continue
        if owner.alive() is not False:
            waiting.append(str(number))
    return sorted(waiting, key=int)


def _wait_until_ready(client: MlflowClient, name: str, version: str) -> str:
    """Poll until model version ``version`` is READY; return its version string."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    delay = 0.2
    while True:
        current = client.get_model_version(name, version)
        status = str(current.status)
        if status == "READY":
            return str(current.version)
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            reason = current.status_message or status
            raise RegistrationError(
                f"model version {name} v{version} did not become READY: {reason}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _is_not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _quote(name: str) -> str:
    """Escape a name for a single-quoted search filter."""
    return name.replace("'", "\\'")
