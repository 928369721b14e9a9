"""Hospital folders (fedxray.flower.folders): image names never leave the folder, and no file
that is already there is ever replaced or written through."""
import os
import re
from pathlib import Path

import pandas as pd
import pytest

import fedxray
from fedxray.flower import write_client_folders, write_nih_folder
from fedxray.flower.folders import _link_or_copy


@pytest.fixture()
def frame(tiny_nih) -> pd.DataFrame:
    return fedxray.load_nih(tiny_nih).head(3).copy()


@pytest.mark.parametrize("name", [
    "../../../escaped.png", "ABSOLUTE", "sub/x.png", "..", ".", "", "x\0.png", "a\\b.png", "C:x.png",
    " 00000001_000.png", float("nan"),
])
def test_names_that_are_not_plain_file_names_are_refused_before_writing(frame, tmp_path, name):
    if name == "ABSOLUTE":
        name = str(tmp_path / "absolute.png")
    frame.loc[1, "image"] = name
    out = tmp_path / "site" / "out"
    expected = re.escape(f"row 1: image name {name!r} is not a plain file name") + ".*nothing was written"
    with pytest.raises(fedxray.DataError, match=expected):
        write_nih_folder(frame, out)
    assert not any(tmp_path.iterdir())               # nothing written, inside the folder or out


def test_a_name_twice_is_refused_before_writing(frame, tmp_path):
    frame.loc[2, "image"] = frame.loc[0, "image"]
    twice = frame.loc[0, "image"]
    with pytest.raises(fedxray.DataError, match=rf"row 2: image name '{twice}' appears twice"):
        write_nih_folder(frame, tmp_path / "out", link=False)
    assert not (tmp_path / "out").exists()


def test_client_folders_check_every_part_before_writing_any(tiny_splits, tmp_path):
    parts = fedxray.partition(tiny_splits["train"], 2, seed=0)
    parts[1] = parts[1].copy()
    parts[1].loc[0, "image"] = "../x.png"
    with pytest.raises(fedxray.DataError, match=r"part 1, row 0: image name '\.\./x\.png'"):
        write_client_folders(parts, tmp_path / "sites")
    assert not (tmp_path / "sites").exists()


@pytest.mark.parametrize("link", [True, False])
def test_an_existing_file_or_planted_link_is_never_overwritten(tmp_path, link):
    src = tmp_path / "src.png"
    src.write_bytes(b"new")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me too")
    planted = tmp_path / "planted.png"
    planted.symlink_to(victim)
    for dst in (existing, planted):
        with pytest.raises(FileExistsError, match=rf"{dst.name} already exists.*nothing was overwritten"):
            _link_or_copy(src, dst, link)
    assert victim.read_bytes() == b"keep me" and existing.read_bytes() == b"keep me too"
    assert planted.is_symlink()


def test_copies_read_back_as_the_same_rows_and_bytes(frame, tmp_path):
    out = write_nih_folder(frame, tmp_path / "out", link=False)
    back = fedxray.load_nih(out)
    cols = [c for c in frame.columns if c != "path"]
    pd.testing.assert_frame_equal(back[cols], frame[cols])
    for src, dst in zip(frame["path"], back["path"]):
        assert Path(dst).read_bytes() == Path(src).read_bytes()
        assert os.stat(dst).st_nlink == 1 and os.stat(dst).st_mtime == os.stat(src).st_mtime


def test_a_missing_source_image_writes_nothing(tiny_splits, tmp_path):
    frame = tiny_splits["val"].copy()
    frame.loc[frame.index[-1], "path"] = str(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match="gone.png.*nothing was written"):
        write_nih_folder(frame, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
