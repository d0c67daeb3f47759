"""Batch ids of the scoring table: one partition per scoring run, and none replaced by chance.

In: what ``--batch-id`` says (nothing, a literal id, or a template with ``{date}`` or
``{datetime}``) and the run's start time. Out: the batch id, and whether it was made up
rather than given. Without ``--batch-id`` the id is the run's UTC date-time,
``{datetime}`` = ``20261122T020000Z`` (ISO 8601 basic format): sortable as text, and only
characters Spark writes into a partition folder's name as they are. ``{date}`` is
``2026-11-22``. A given id (after the template) replaces that batch, and only it.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime

from pipelines.errors import UserError
from pipelines.score_table import BATCH_ID

#: Placeholders of a ``--batch-id`` template, as ``strftime`` formats of the UTC start time.
PLACEHOLDERS = {"date": "%Y-%m-%d", "datetime": "%Y%m%dT%H%M%SZ"}

#: The batch id of a run that names none.
DEFAULT_TEMPLATE = "{datetime}"


class BatchIdError(UserError):
    """A ``--batch-id`` that cannot name a batch; the message says why."""


def resolve_batch_id(given: str | None, started: datetime) -> tuple[str, bool]:
    """The batch id of a scoring run that started at ``started``.

    Args:
        given: ``--batch-id``: None (the run's date-time), a literal id, or a template with
            ``{date}`` / ``{datetime}`` placeholders.
        started: When the run started (a naive time is taken as UTC).

    Returns:
        The id, and True when it was generated (no ``--batch-id``): such an id must not
        replace a batch that is already there.

    Raises:
        BatchIdError: An unknown placeholder, a Databricks dynamic value reference that was
            never resolved, or characters a partition value cannot hold.
    """
    if given is not None and "{{" in given:
        raise BatchIdError(
            f"--batch-id {given!r} holds a Databricks dynamic value reference, which only a "
            "Databricks job resolves; pass a batch id or a template such as '{date}'"
        )
    template = DEFAULT_TEMPLATE if given is None else given
    when = started.replace(tzinfo=UTC) if started.tzinfo is None else started.astimezone(UTC)
    fields = [name for _, name, _, _ in _parse(template) if name is not None]
    unknown = sorted(set(fields) - set(PLACEHOLDERS))
    if unknown:
        known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
        raise BatchIdError(
            f"--batch-id {template!r}: unknown placeholder {{{unknown[0]}}} (known: {known})"
        )
    try:
        resolved = template.format(**{k: when.strftime(f) for k, f in PLACEHOLDERS.items()})
    except (ValueError, IndexError, KeyError) as exc:  # a format spec, {0}, ...
        raise BatchIdError(f"--batch-id {template!r}: {exc}") from None
    if not BATCH_ID.fullmatch(resolved):
        raise BatchIdError(
            f"batch id {resolved!r} must be 1 to 128 letters, digits or . _ : + - "
            "(it names a partition of the table)"
        )
    return resolved, given is None


def _parse(template: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(template))
    except ValueError as exc:
        raise BatchIdError(f"--batch-id {template!r}: {exc}") from None
