"""The configuration reference, generated from the config model: ``docs/configuration.md``.

In: :mod:`pipelines.config` — the sections' fields (their defaults), pydantic's JSON schema of
them (types, choices, bounds) and the ``Attributes:`` of each section's docstring (the
descriptions). Out: one Markdown page, every key with its type, default and description
(:func:`reference`). ``make docs`` writes it; ``tests/unit/test_config_docs.py`` fails when
the page and the model drift apart, or when a key has no description.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from collections.abc import Iterator
from typing import Any

from pipelines.config import Config, _adapter

#: Where the page lives in the repository.
REFERENCE_PAGE = "docs/configuration.md"

_HEADER = """\
# Configuration reference

Generated from the configuration model (`pipelines/config.py`) by `make docs`; do not edit
by hand. Every key can be set in an overlay (`--config FILE`), or one at a time with
`--set section.key=value`; `dlpipe config show` prints the resolved values and where each
came from. `conf/base.yaml` holds the same keys with the same defaults, with comments.
Unknown keys, wrong types and values out of range fail before any work, naming the key.
"""


def reference() -> str:
    """The whole page."""
    schema = _adapter().json_schema()
    definitions = schema.get("$defs", {})
    lines = [_HEADER]
    for title, section, keys in _sections(Config, "", schema, definitions):
        lines += [f"\n## `{title}`\n" if title else "\n## Top level\n"]
        doc = _summary(section)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{key}` | {kind} | {default} | {text} |" for key, kind, default, text in keys]
    return "\n".join(lines) + "\n"


def missing_descriptions() -> list[str]:
    """Dotted keys whose section's docstring does not describe them."""
    schema = _adapter().json_schema()
    return [
        key
        for _, _, keys in _sections(Config, "", schema, schema.get("$defs", {}))
        for key, _, _, text in keys
        if not text
    ]


def _sections(
    section: type, prefix: str, schema: dict[str, Any], definitions: dict[str, Any]
) -> Iterator[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """Each section (its dotted name, class, and rows), then its sub-sections, depth first."""
    hints = typing.get_type_hints(section)
    descriptions = _attribute_docs(section)
    properties = schema.get("properties", {})
    rows, subsections = [], []
    for field in dataclasses.fields(section):
        hint = hints[field.name]
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hint):
            subsections.append((key, hint, _resolve(properties[field.name], definitions)))
            continue
        rows.append(
            (
                key,
                _type_text(properties.get(field.name, {}), definitions),
                _default_text(field),
                descriptions.get(field.name, ""),
            )
        )
    yield prefix.rstrip("."), section, rows
    for key, hint, sub_schema in subsections:
        yield from _sections(hint, f"{key}.", sub_schema, definitions)


def _resolve(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """A section's own schema, through ``$ref`` and single-member ``allOf``."""
    if "$ref" in schema:
        return definitions[schema["$ref"].rsplit("/", 1)[-1]]
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _resolve(schema["allOf"][0], definitions)
    return schema


def _type_text(schema: dict[str, Any], definitions: dict[str, Any]) -> str:
    """A key's type as people read it: choices, bounds, ``or null``."""
    if "anyOf" in schema:
        return " or ".join(_type_text(member, definitions) for member in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type")
    if kind == "null":
        return "null"
    if kind == "array":
        return f"list of {_type_text(schema.get('items', {}), definitions)}s"
    if kind == "object":
        values = _type_text(schema.get("additionalProperties", {}), definitions)
        return f"mapping of strings to {values}s" if values != "any" else "mapping"
    names = {"integer": "integer", "number": "number", "boolean": "true/false", "string": "string"}
    text = names.get(kind, "any")
    bounds = [
        f"{sign} {_number(schema[name])}"
        for name, sign in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if name in schema
    ]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:  # pragma: no cover - every key has a default
        return ""
    return f"`{json.dumps(value)}`"


def _summary(section: type) -> str:
    """The first paragraph of a section's docstring."""
    doc = inspect.getdoc(section) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").replace("``", "`").strip()


def _attribute_docs(section: type) -> dict[str, str]:
    """``name -> description`` from a section's ``Attributes:`` (continuation lines joined)."""
    doc = inspect.getdoc(section) or ""
    if "Attributes:" not in doc:
        return {}
    body = doc.split("Attributes:", 1)[1]
    found: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            current = entry.group(1)
            found[current] = entry.group(2).strip()
        elif current and line.startswith("        "):
            found[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break  # the next docstring section
    # Docstrings are reStructuredText (``code``); the page is Markdown (`code`).
    return {name: text.replace("``", "`").replace("|", "\\|") for name, text in found.items()}
