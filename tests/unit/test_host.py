"""Host facts: the checkout's commit, and the cores each TensorFlow process gets."""

from __future__ import annotations

import os
import subprocess

from pipelines.host import REPO, cores_per_process, git_commit


def test_git_commit_is_the_checkout_head_and_short_is_its_prefix():
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert git_commit() == head
    assert head.startswith(git_commit(short=True)) and len(git_commit(short=True)) < len(head)


def test_cores_are_divided_between_processes_and_never_reach_zero():
    cores = os.cpu_count() or 1
    assert cores_per_process(1) == cores
    assert cores_per_process(0) == cores  # no sharer counts as one
    assert cores_per_process(cores * 4) == 1
