"""The overhead benchmark's cause profile: ``-X importtime`` read as seconds per package."""

from __future__ import annotations

import pytest

from pipelines.bench.overhead import import_seconds, summarize_importtime

IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:    200000 |     200000 |       tensorflow.python.pywrap
import time:    300000 |     500000 |     tensorflow.python
import time:     50000 |     550000 |   tensorflow
import time:     20000 |      20000 |     numpy.core
import time:    400000 |     420000 |   mlflow
not an importtime line
"""


def test_each_modules_own_time_counts_to_its_top_level_package() -> None:
    seconds = summarize_importtime(IMPORTTIME)
    # tensorflow: its three modules' own time; numpy's, imported from mlflow, is numpy's.
    assert seconds == {"tensorflow": 0.55, "mlflow": 0.4, "numpy": 0.02, "_io": 0.0, "total": 0.97}
    assert list(summarize_importtime(IMPORTTIME, top=1)) == ["tensorflow", "total"]


def test_a_real_interpreter_is_profiled() -> None:
    seconds = import_seconds(("tomllib", "xml.dom.minidom"), top=100)
    assert {"tomllib", "xml", "total"} <= set(seconds)
    assert seconds["total"] >= seconds["xml"] > 0


def test_an_import_that_fails_is_one_line() -> None:
    with pytest.raises(RuntimeError, match="No module named 'no_such_package_xyz'"):
        import_seconds(("no_such_package_xyz",))
