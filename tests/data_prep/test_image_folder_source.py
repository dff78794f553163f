"""Reading an image folder with sidecar captions: order, keys and skip reasons."""

from __future__ import annotations

import re

import pytest

from data_prep.errors import DataPrepError
from data_prep.sources import Skip, SourceItem, iter_image_folder, key_for


def _write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


def test_items_skips_and_order(tmp_path):
    _write(tmp_path / "b.png", b"img-b")
    _write(tmp_path / "b.txt", "  a caption\n")
    _write(tmp_path / "a" / "z.JPG", b"img-z")
    _write(tmp_path / "a" / "z.txt", "\ufeffwith bom")
    _write(tmp_path / "c.webp", b"img-c")  # no caption
    _write(tmp_path / "d.bmp", b"img-d")
    _write(tmp_path / "d.txt", " \n")
    _write(tmp_path / "notes.txt", "not an image")
    _write(tmp_path / "._b.png", b"macos resource fork")
    _write(tmp_path / ".ipynb_checkpoints" / "b.png", b"copy")

    out = list(iter_image_folder(tmp_path))
    assert [o.source_id for o in out] == ["a/z.JPG", "b.png", "c.webp", "d.bmp"]
    z, b, c, d = out
    assert z == SourceItem(key=key_for("a/z.JPG"), source_id="a/z.JPG", data=b"img-z", caption="with bom")
    assert b == SourceItem(key=key_for("b.png"), source_id="b.png", data=b"img-b", caption="a caption")
    assert isinstance(c, Skip) and c.reason == "missing_caption"
    assert isinstance(d, Skip) and d.reason == "empty_caption"


def test_keys_are_stable_unique_and_webdataset_safe():
    ids = ["a/b.c.png", "a/b.png", "x.png"]
    keys = [key_for(i) for i in ids]
    assert keys == [key_for(i) for i in ids]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[0-9a-f]{16}", k) for k in keys)


def test_unreadable_image_is_skipped(tmp_path):
    _write(tmp_path / "ok.png", b"img")
    _write(tmp_path / "ok.txt", "cap")
    # A dangling symlink is listed like a file but cannot be read (chmod would not stop root).
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing-target.png")
    _write(tmp_path / "gone.txt", "cap")
    out = list(iter_image_folder(tmp_path))
    assert [o.source_id for o in out] == ["gone.png", "ok.png"]
    assert isinstance(out[0], Skip) and out[0].reason == "unreadable_file"
    assert isinstance(out[1], SourceItem)


def test_missing_root_raises_at_call_time(tmp_path):
    with pytest.raises(DataPrepError, match="does not exist"):
        iter_image_folder(tmp_path / "nope")  # no next(): the check must not wait for iteration
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataPrepError, match="does not exist"):
        iter_image_folder(tmp_path / "file")
