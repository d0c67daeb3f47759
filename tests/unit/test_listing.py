"""Reading a listed file by path: its bytes, or why not."""

from __future__ import annotations

from pipelines.listing import read_file


def test_read_file_gives_the_bytes_or_a_one_line_reason(tmp_path):
    image = tmp_path / "a b%41é.png"
    image.write_bytes(b"\x89PNG bytes")
    (tmp_path / "folder.png").mkdir()

    assert read_file(str(image)) == (b"\x89PNG bytes", None)
    assert read_file(str(tmp_path / "gone.png")) == (
        None,
        "cannot read file: No such file or directory",
    )
    assert read_file(str(tmp_path / "folder.png")) == (None, "cannot read file: Is a directory")
