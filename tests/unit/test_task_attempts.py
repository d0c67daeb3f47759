"""Task retries for elastic training on a local master (``local[N]`` tries a task once)."""

from __future__ import annotations

from pipelines.spark import ELASTIC_TASK_ATTEMPTS, local_task_attempts, with_task_attempts


def test_a_local_master_without_retries_gets_them_and_one_with_its_own_keeps_them() -> None:
    assert with_task_attempts("local[2]", ELASTIC_TASK_ATTEMPTS) == "local[2,4]"
    assert with_task_attempts("local", 3) == "local[1,3]"
    assert with_task_attempts("local[*]", 4) == "local[*,4]"
    assert with_task_attempts("local[2,7]", 4) == "local[2,7]"
    assert with_task_attempts("spark://host:7077", 4) == "spark://host:7077"


def test_the_attempts_of_a_master_url() -> None:
    assert local_task_attempts("local[2]") == 1
    assert local_task_attempts("local") == 1
    assert local_task_attempts("local[2, 5]") == 5
    assert local_task_attempts("local[*,4]") == 4
    assert local_task_attempts("spark://host:7077") is None
    assert local_task_attempts("yarn") is None
