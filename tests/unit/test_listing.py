"""Reading a listed file by path: its bytes, or why not."""

from __future__ import annotations

import os

from pipelines.listing import display_path, list_tree, read_file


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


def test_display_path_keeps_utf8_and_escapes_undecodable_bytes():
    assert display_path("/data/a b%41é [1].png") == "/data/a b%41é [1].png"
    latin1 = os.fsdecode(b"/data/caf\xe9.png")  # as os.scandir gives it: a lone surrogate
    assert display_path(latin1) == "/data/caf\\xe9.png"
    display_path(latin1).encode("utf-8")  # what Spark, Arrow, Parquet and JSON need


def test_a_name_that_is_not_utf8_is_listed_and_read_by_its_raw_bytes(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"cl\xe4ss")
    os.mkdir(folder)
    with open(os.path.join(folder, b"caf\xe9.png"), "wb") as file:
        file.write(b"\x89PNG bytes")

    listing = list_tree(tmp_path)
    [rel] = listing.images
    assert display_path(rel) == "cl\\xe4ss/caf\\xe9.png"
    raw = os.fsencode(f"{tmp_path}/{rel}")
    assert read_file(raw) == (b"\x89PNG bytes", None)
    assert read_file(f"{tmp_path}/{rel}") == (b"\x89PNG bytes", None)


def test_without_sizes_every_image_name_is_listed_and_left_to_its_reader(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "ok.png").write_bytes(b"\x89PNG bytes")
    (tmp_path / "cls" / "zero.png").write_bytes(b"")
    (tmp_path / "cls" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "cls" / "notes.txt").write_text("not an image")

    with_sizes = list_tree(tmp_path)
    assert with_sizes.images == ["cls/ok.png"]
    assert with_sizes.empty == ["cls/zero.png"]
    assert list(with_sizes.unreadable) == ["cls/broken.png"]

    by_name = list_tree(tmp_path, sizes=False)
    assert by_name.images == ["cls/broken.png", "cls/ok.png", "cls/zero.png"]
    assert (by_name.empty, by_name.unreadable, by_name.skipped) == ([], {}, 1)
    # The reader then gives the broken link the reason the listing would have given.
    reason = with_sizes.unreadable["cls/broken.png"]
    assert read_file(str(tmp_path / "cls" / "broken.png")) == (None, reason)
