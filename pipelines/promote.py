"""Moving the champion alias by hand: ``dlpipe promote --version N`` and ``--rollback``.

In: the registered model, its alias, and either a version to promote or a rollback, with
an optional reason. Out: the alias moved, the version that took it tagged with who (user
and host), when, why and which version held the alias before; a :class:`HandPromotion`
naming the previous and the new holder.

A rollback moves the alias to the version that held it before the current holder took it
(the holder's ``previous_champion`` tag, set by training and by this module). The version
rolled back to keeps its own ``previous_champion``, so rolling back again walks further
back; promoting by hand records the version it replaced.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import asdict, dataclass
from typing import Any

from mlflow.exceptions import MlflowException

from pipelines import tracking
from pipelines.errors import UserError
from pipelines.registry import (
    DECISION_TAG,
    PREVIOUS_CHAMPION_TAG,
    PROMOTED_AT_TAG,
    PROMOTED_BY_TAG,
    ModelNotFoundError,
    _alias_holder,
    _is_not_found,
    _now,
    _require_registered_model,
)

#: Tags on a version promoted by hand, besides the decision and who/when.
REASON_TAG = "promotion_reason"
ROLLED_BACK_FROM_TAG = "rolled_back_from"


class PromotionError(UserError):
    """The alias cannot be moved as asked (nothing to roll back to, ...)."""


@dataclass(frozen=True)
class HandPromotion:
    """What ``dlpipe promote`` did.

    Attributes:
        model_name: The registered model.
        alias: The alias moved.
        previous: The version that held it before (None: none did).
        champion: The version holding it now.
        decision: The one line tagged on that version.
        by: Who moved it: ``user@host``.
    """

    model_name: str
    alias: str
    previous: str | None
    champion: str
    decision: str
    by: str

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict."""
        return asdict(self)


def promote(
    *,
    model_name: str,
    alias: str,
    tracking_uri: str,
    registry_uri: str | None = None,
    version: str | None = None,
    rollback: bool = False,
    reason: str | None = None,
) -> HandPromotion:
    """Move ``alias`` to ``version``, or back to the previous champion (``rollback``).

    Raises:
        ModelNotFoundError: The model or the version does not exist.
        PromotionError: Neither or both of ``version`` and ``rollback``; nothing to roll
            back to (no champion, or one without a ``previous_champion`` tag).
    """
    if (version is None) == (not rollback):
        raise PromotionError("give either --version N or --rollback")
    client = tracking.client(tracking_uri, registry_uri)
    _require_registered_model(client, model_name, registry_uri or tracking_uri)
    current = _alias_holder(client, model_name, alias)
    previous = str(current.version) if current is not None else None
    if rollback:
        if current is None:
            raise PromotionError(f"no version of {model_name} holds @{alias}: nothing to roll back")
        target = current.tags.get(PREVIOUS_CHAMPION_TAG)
        if not target:
            raise PromotionError(
                f"{model_name} v{previous} (@{alias}) records no previous champion; "
                "promote a version by hand with --version N"
            )
    else:
        target = str(version)
    _require_version(client, model_name, target)
    by = _who()
    if target == previous:
        return HandPromotion(
            model_name, alias, previous, target, f"v{target} already holds @{alias}", by
        )
    why = reason or "no reason given"
    if rollback:
        decision = f"rolled back from v{previous} by {by}: {why}"
    else:
        decision = f"promoted by hand over v{previous} by {by}: {why}"
    client.set_registered_model_alias(model_name, alias, target)
    tags = {DECISION_TAG: decision, PROMOTED_BY_TAG: by, PROMOTED_AT_TAG: _now()}
    tags[REASON_TAG] = why
    if rollback:
        tags[ROLLED_BACK_FROM_TAG] = str(previous)
    elif previous is not None:
        tags[PREVIOUS_CHAMPION_TAG] = previous
    for key, value in tags.items():
        client.set_model_version_tag(model_name, target, key, value)
    return HandPromotion(model_name, alias, previous, target, decision, by)


def _require_version(client: Any, name: str, version: str) -> None:
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        raise ModelNotFoundError(f"registered model {name} has no version {version}") from None


def _who() -> str:
    """``user@host`` of this process (the user as the OS knows it, else ``unknown``)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
