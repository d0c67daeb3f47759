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


def test_a_settled_worker_skips_its_live_objects_and_still_imports_from_zips(tmp_path):
    import gc
    import sys
    import zipfile
    import zipimport

    from pipelines.host import settle_python_worker

    archive = tmp_path / "mods.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("dlpipe_zip_a.py", "VALUE = 'a'\n")
        zipped.writestr("dlpipe_zip_b.py", "VALUE = 'b'\n")
    sys.path.append(str(archive))
    try:
        import dlpipe_zip_a

        assert isinstance(sys.path_importer_cache[str(archive)], zipimport.zipimporter)
        settle_python_worker()
        assert gc.get_freeze_count() > 0
        assert not any(
            isinstance(f, zipimport.zipimporter) for f in sys.path_importer_cache.values()
        )
        import dlpipe_zip_b  # the importer is rebuilt when an import needs it

        assert (dlpipe_zip_a.VALUE, dlpipe_zip_b.VALUE) == ("a", "b")
    finally:
        gc.unfreeze()
        sys.path.remove(str(archive))
        sys.modules.pop("dlpipe_zip_a", None)
        sys.modules.pop("dlpipe_zip_b", None)
