"""The configuration reference is generated from the config model and kept in step with it."""

from __future__ import annotations

from pathlib import Path

from pipelines.config_docs import REFERENCE_PAGE, missing_descriptions, reference

REPO = Path(__file__).resolve().parents[2]


def test_every_key_has_a_description() -> None:
    assert missing_descriptions() == []


def test_the_reference_page_is_the_generated_one() -> None:
    page = REPO / REFERENCE_PAGE
    assert page.is_file(), f"{REFERENCE_PAGE} is missing: run make docs"
    assert page.read_text() == reference(), f"{REFERENCE_PAGE} is stale: run make docs"


def test_the_reference_lists_every_key_with_type_and_default() -> None:
    text = reference()
    assert "| `train.learning_rate` | number (> 0, <= 10) | `0.0005` |" in text
    assert '| `ingest.format` | one of `"auto"`, `"folder"`, `"mnist-idx"`, `"cifar10"` |' in text
    assert "| `train.horovod.compression` |" in text  # sub-sections too
    assert "``" not in text  # Markdown, not reStructuredText
