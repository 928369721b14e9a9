"""The NIH data layer: CSV flavours, real sample images, the split at full scale, bad inputs."""
import io
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import fedxray
from fedxray import LABELS, DataError, ImageDecodeError
from fedxray.data import IMAGENET_MEAN, IMAGENET_STD, find_csv, read_split_list

KAGGLE_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                 "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


# ----------------------------------------------------------------------------- CSV flavours

def _kaggle_rows(csv_text: str) -> list[list[str]]:
    lines = csv_text.strip().splitlines()
    assert lines[0] == KAGGLE_HEADER
    return [line.split(",") for line in lines[1:]]


def write_v2020(rows, path):
    """NIH's 2020 revision: no trailing comma, 11 columns, 'Patient Sex'."""
    header = KAGGLE_HEADER.rstrip(",").replace("Patient Gender", "Patient Sex")
    path.write_text("\n".join([header] + [",".join(r[:11]) for r in rows]) + "\n")


def write_2017_original(rows, path):
    """The original 2017 release: ages like 058Y and zero-padded patient ids."""
    out = [KAGGLE_HEADER.rstrip(",")]
    for r in rows:
        r = list(r[:11])
        r[3] = f"{int(r[3]):08d}"
        r[4] = f"{int(r[4]):03d}Y"
        out.append(",".join(r))
    path.write_text("\n".join(out) + "\n")


@pytest.mark.parametrize("source", ["sample", "full"])
def test_three_csv_flavours_agree(source, tmp_path, request):
    folder = request.getfixturevalue("nih_sample" if source == "sample" else "nih_metadata")
    kaggle_csv = folder / "Data_Entry_2017.csv"
    rows = _kaggle_rows(kaggle_csv.read_text())
    write_v2020(rows, tmp_path / "Data_Entry_2017_v2020.csv")
    write_2017_original(rows, tmp_path / "orig.csv")
    a = fedxray.read_metadata(kaggle_csv)
    b = fedxray.read_metadata(tmp_path / "Data_Entry_2017_v2020.csv")
    c = fedxray.read_metadata(tmp_path / "orig.csv")
    assert len(a) == len(rows)
    for other in (b, c):
        pd.testing.assert_series_equal(a["image"], other["image"])
        pd.testing.assert_series_equal(a["patient_id"], other["patient_id"])
        pd.testing.assert_frame_equal(a[list(LABELS)], other[list(LABELS)])
        pd.testing.assert_series_equal(a["sex"], other["sex"])
        pd.testing.assert_series_equal(a["view"], other["view"])
        np.testing.assert_array_equal(a["age"].to_numpy(), other["age"].to_numpy())
    assert a["patient_id"].dtype == np.int64


def test_columns_and_label_parsing(tmp_path):
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(KAGGLE_HEADER + "\n"
                   "00000001_000.png,Cardiomegaly|Emphysema,0,1,58,M,PA,2682,2749,0.143,0.143\n"
                   "00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.171,0.171\n"
                   "00000003_000.png,Pleural_Thickening|Hernia,1,3,011M,F,PA,2500,2048,0.171,0.171\n")
    m = fedxray.read_metadata(csv)
    assert list(m.columns[:6]) == ["image", "patient_id", "view", "age", "sex", "follow_up"]
    assert list(m.columns[6:]) == list(LABELS)
    assert m.loc[0, ["Cardiomegaly", "Emphysema"]].tolist() == [1, 1]
    assert m.loc[0, list(LABELS)].sum() == 2
    assert m.loc[1, list(LABELS)].sum() == 0            # No Finding is all zeros
    assert m.loc[2, ["Pleural_Thickening", "Hernia"]].tolist() == [1, 1]
    assert m.loc[2, "age"] == pytest.approx(11 / 12)
    assert fedxray.label_matrix(m).dtype == np.float32


def test_implausible_age_kept_as_nan(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text(KAGGLE_HEADER + "\n00000001_000.png,No Finding,0,1,414,M,PA,1,1,1,1\n")
    m = fedxray.read_metadata(csv)
    assert len(m) == 1 and np.isnan(m.loc[0, "age"])


# ----------------------------------------------------------------------------- the real sample

def test_real_sample_loads_every_image(nih_sample):
    meta = fedxray.load_nih(nih_sample)
    assert len(meta) == 240
    raw = pd.read_csv(nih_sample / "Data_Entry_2017.csv")
    for _, row in raw.iterrows():            # labels match the CSV's own text, finding by finding
        names = set(row["Finding Labels"].split("|")) - {"No Finding"}
        got = meta.loc[meta["image"] == row["Image Index"], list(LABELS)].iloc[0]
        assert {n for n in LABELS if got[n] == 1} == names
    ds = fedxray.NIHDataset(meta, image_size=64)
    modes = {}
    for i in range(len(ds)):
        with Image.open(meta.loc[i, "path"]) as im:
            modes[im.mode] = modes.get(im.mode, 0) + 1
        x, y = ds[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert x.std() > 0.05, meta.loc[i, "image"]   # never a blank image
        torch.testing.assert_close(y, torch.from_numpy(fedxray.label_matrix(meta.iloc[[i]])[0]))
    assert modes == {"L": 237, "RGBA": 3}


def test_rgba_sample_equals_its_gray_channel(nih_sample):
    meta = fedxray.load_nih(nih_sample)
    for p in meta["path"]:
        with Image.open(p) as im:
            if im.mode == "RGBA":
                expected = np.asarray(im)[..., 0]
                np.testing.assert_array_equal(fedxray.load_gray(p), expected)


def test_real_sample_split_follows_official_lists(nih_sample):
    meta = fedxray.load_nih(nih_sample)
    splits = fedxray.split_by_patient(meta)          # lists found beside the CSV
    test_list = read_split_list(nih_sample / "test_list.txt")
    assert set(splits["test"]["image"]) == set(meta["image"]) & test_list
    assert len(splits["test"]) == 37
    assert len(splits["train"]) + len(splits["val"]) == 203
    assert not (set(splits["train"]["image"]) | set(splits["val"]["image"])) & test_list


# ----------------------------------------------------------------------------- full scale

def test_full_scale_split(nih_metadata):
    t0 = time.perf_counter()
    meta = fedxray.read_metadata(nih_metadata / "Data_Entry_2017.csv")
    splits = fedxray.split_by_patient(meta, lists_dir=nih_metadata, val_fraction=0.1, seed=0)
    elapsed = time.perf_counter() - t0
    assert len(meta) == 112_120 and meta["patient_id"].nunique() == 30_805
    assert set(splits["test"]["image"]) == read_split_list(nih_metadata / "test_list.txt")
    assert len(splits["test"]) == 25_596
    assert len(splits["train"]) + len(splits["val"]) == 86_524
    pats = {k: set(v["patient_id"]) for k, v in splits.items()}
    assert not pats["train"] & pats["val"] and not pats["train"] & pats["test"] and not pats["val"] & pats["test"]
    assert 0.08 < len(pats["val"]) / (len(pats["train"]) + len(pats["val"])) < 0.12
    # A guard against per-row Python loops (about 1.5 s here), not a benchmark.
    assert elapsed < 20, f"reading + splitting 112,120 rows took {elapsed:.1f} s"


def test_seeded_split_without_lists(tmp_path, nih_metadata):
    meta = fedxray.read_metadata(nih_metadata / "Data_Entry_2017.csv")
    meta.attrs.clear()                                # no lists beside it: seeded patient split
    s1 = fedxray.split_by_patient(meta, seed=1)
    s2 = fedxray.split_by_patient(meta, seed=1)
    s3 = fedxray.split_by_patient(meta, seed=2)
    assert s1["test"]["image"].equals(s2["test"]["image"])
    assert not s1["test"]["image"].equals(s3["test"]["image"])
    pats = {k: set(v["patient_id"]) for k, v in s1.items()}
    assert not pats["train"] & pats["test"] and not pats["val"] & pats["test"] and not pats["train"] & pats["val"]
    assert sum(len(v) for v in s1.values()) == len(meta)
    assert 0.18 < len(pats["test"]) / meta["patient_id"].nunique() < 0.22


# ----------------------------------------------------------------------------- layouts and images

def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _tiny_dataset(root, names, layout="kaggle"):
    lines = [KAGGLE_HEADER]
    for i, name in enumerate(names):
        pid = int(name[:8])
        lines.append(f"{name},No Finding,0,{pid},40,M,PA,1,1,1,1")
        folder = root / f"images_{1 + i % 2:03d}" / "images" if layout == "kaggle" else root
        _png(folder / name, np.full((16, 16), 10 * i, np.uint8))
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("layout", ["kaggle", "flat"])
def test_image_index_layouts(tmp_path, layout):
    names = [f"{p:08d}_000.png" for p in range(1, 5)]
    _tiny_dataset(tmp_path, names, layout)
    meta = fedxray.load_nih(tmp_path)
    assert [os.path.basename(p) for p in meta["path"]] == names


def test_find_csv_searches_kaggle_input(tmp_path):
    data = tmp_path / "input" / "data"
    data.mkdir(parents=True)
    (data / "Data_Entry_2017.csv").write_text(KAGGLE_HEADER + "\n")
    assert find_csv(search_root=tmp_path / "input") == data / "Data_Entry_2017.csv"
    with pytest.raises(FileNotFoundError, match="attach the NIH"):
        find_csv(search_root=tmp_path / "nothing")


def test_16bit_and_rgba_pngs(tmp_path):
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    _png(tmp_path / "l.png", ramp)
    _png(tmp_path / "rgba.png", np.dstack([ramp, ramp, ramp, np.full_like(ramp, 255)]), "RGBA")
    Image.fromarray(ramp.astype(np.uint16) * 257).save(tmp_path / "i16.png")   # full 16-bit range
    with Image.open(tmp_path / "i16.png") as im:
        assert im.mode.startswith("I")
    for name in ("l.png", "rgba.png", "i16.png"):
        np.testing.assert_array_equal(fedxray.load_gray(tmp_path / name), ramp, err_msg=name)


def test_normalization_matches_imagenet(tmp_path):
    _png(tmp_path / "00000001_000.png", np.full((8, 8), 128, np.uint8))
    frame = pd.DataFrame({"path": [str(tmp_path / "00000001_000.png")], **{n: [0] for n in LABELS}})
    x, y = fedxray.NIHDataset(frame, image_size=32)[0]
    assert x.shape == (3, 32, 32) and y.shape == (14,) and y.dtype == torch.float32
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(expected, dtype=torch.float32))


# ----------------------------------------------------------------------------- bad inputs

def test_missing_csv_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        fedxray.read_metadata(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="No Data_Entry_2017"):
        fedxray.load_nih(tmp_path)


def test_missing_column_is_named(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender\n"
                   "00000001_000.png,No Finding,1,40,M\n")
    with pytest.raises(DataError, match=r"d\.csv.*'View Position'"):
        fedxray.read_metadata(csv)


def test_unknown_finding_is_named_with_count(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text(KAGGLE_HEADER + "\n"
                   "00000001_000.png,Cardiomegaly|Pneumonitis,0,1,40,M,PA,1,1,1,1\n"
                   "00000002_000.png,pneumonitis,0,2,40,M,PA,1,1,1,1\n"
                   "00000003_000.png,Pneumonitis,0,3,40,M,PA,1,1,1,1\n")
    with pytest.raises(DataError, match=r"'Pneumonitis' \(2 rows\).*'pneumonitis' \(1 row\)"):
        fedxray.read_metadata(csv)


def test_missing_images_error_or_explicit_drop(tmp_path, caplog):
    names = [f"{p:08d}_000.png" for p in range(1, 7)]
    _tiny_dataset(tmp_path, names)
    for name in names[:2]:
        next(tmp_path.rglob(name)).unlink()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(FileNotFoundError, match=r"2 of 6 images .*00000001_000\.png.*drop_missing=True"):
        fedxray.load_nih(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before     # nothing written
    with caplog.at_level("WARNING"):
        meta = fedxray.load_nih(tmp_path, drop_missing=True)
    assert list(meta["image"]) == names[2:]
    assert "dropped 2 of 6" in caplog.text


def test_corrupt_and_truncated_png_name_the_file(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good, "PNG")
    (tmp_path / "00000001_000.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "00000002_000.png").write_bytes(b"not a png at all")
    for name in ("00000001_000.png", "00000002_000.png"):
        with pytest.raises(ImageDecodeError, match=name):
            fedxray.load_gray(tmp_path / name)
    frame = pd.DataFrame({"path": [str(tmp_path / "00000001_000.png")], **{n: [0] for n in LABELS}})
    with pytest.raises(ImageDecodeError, match="00000001_000.png"):
        fedxray.NIHDataset(frame, image_size=32, preload=True)


def test_split_lists_must_match_metadata(tmp_path, nih_sample):
    meta = fedxray.load_nih(nih_sample)
    shutil.copy(nih_sample / "train_val_list.txt", tmp_path)
    with pytest.raises(FileNotFoundError, match="test_list.txt"):
        fedxray.split_by_patient(meta, lists_dir=tmp_path)


# ----------------------------------------------------------------------------- hostile inputs

def _csv_with(tmp_path, rows):
    """A Kaggle-flavour CSV from (image, labels, follow_up, patient_id) rows."""
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(KAGGLE_HEADER + "\n" + "".join(f"{i},{lab},{fu},{pid},40,M,PA,1,1,1,1\n"
                                                  for i, lab, fu, pid in rows))
    return csv


def test_whole_numbers_in_any_spelling_are_read(tmp_path):
    csv = _csv_with(tmp_path, [("a.png", "No Finding", "0", "12"),
                               ("b.png", "No Finding", " 3 ", " 13 "),
                               ("c.png", "No Finding", "4.0", "00000014"),
                               ("d.png", "No Finding", "5", "15.0")])
    m = fedxray.read_metadata(csv)
    assert m["patient_id"].tolist() == [12, 13, 14, 15] and m["patient_id"].dtype == np.int64
    assert m["follow_up"].tolist() == [0, 3, 4, 5]


@pytest.mark.parametrize("column, value", [
    ("Patient ID", "99999999999999999999"),    # beyond int64: became -9223372036854775808
    ("Patient ID", "1e30"),                    # an exponent: the same
    ("Patient ID", "-5"),
    ("Patient ID", "0"),                       # NIH ids start at 1
    ("Patient ID", "12.5"),
    ("Follow-up #", "99999999999999999999"),
    ("Follow-up #", "-1"),
])
def test_out_of_range_ids_are_refused_by_value_and_line(tmp_path, column, value):
    rows = [("a.png", "No Finding", "0", "1"), ("b.png", "No Finding", "0", "2"),
            ("c.png", "No Finding", "0", "3")]
    i, lab, fu, pid = rows[1]
    rows[1] = (i, lab, value, pid) if column == "Follow-up #" else (i, lab, fu, value)
    csv = _csv_with(tmp_path, rows)
    with pytest.raises(DataError, match=rf"1 row\(s\) whose '{column}' .*first '{value}' on line 3"):
        fedxray.read_metadata(csv)


def test_ids_beyond_int64_never_merge_patients(tmp_path):
    csv = _csv_with(tmp_path, [("a.png", "No Finding", "0", "99999999999999999999"),
                               ("b.png", "No Finding", "0", "88888888888888888888")])
    with pytest.raises(DataError, match=r"2 row\(s\) whose 'Patient ID'.*line 2"):
        fedxray.read_metadata(csv)


def test_no_finding_with_a_finding_is_a_contradiction_not_an_unknown_name(tmp_path):
    csv = _csv_with(tmp_path, [("a.png", "No Finding|Effusion", "0", "1"),
                               ("b.png", "No Finding|Effusion", "0", "2"),
                               ("c.png", "Atelectasis|No Finding", "0", "3"),
                               ("d.png", "No Finding", "0", "4")])
    with pytest.raises(DataError) as e:
        fedxray.read_metadata(csv)
    msg = str(e.value)
    assert "unknown" not in msg
    assert "'No Finding' combined with findings on 3 rows" in msg
    assert "'Atelectasis|No Finding' (1 row), 'No Finding|Effusion' (2 rows)" in msg
    assert "keep either its findings or 'No Finding'" in msg


def test_oversized_image_is_a_decode_error_naming_file_and_pixels(tmp_path, monkeypatch):
    _png(tmp_path / "00000001_000.png", np.zeros((40, 50), np.uint8))      # 2,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)                    # refused above 1,800
    with pytest.raises(ImageDecodeError, match=r"00000001_000\.png.*2000 pixels.*1024x1024.*"
                                               r"remove or replace it.*PIL\.Image\.MAX_IMAGE_PIXELS"):
        fedxray.load_gray(tmp_path / "00000001_000.png")
    # Between 1x and 2x the limit Pillow only warns, and the image decodes.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    with pytest.warns(Image.DecompressionBombWarning):
        assert fedxray.load_gray(tmp_path / "00000001_000.png").shape == (40, 50)


def test_linked_image_folders_are_followed(tmp_path):
    names = [f"{p:08d}_000.png" for p in range(1, 5)]
    _tiny_dataset(tmp_path / "kaggle", names)
    data = tmp_path / "work"
    data.mkdir()
    shutil.copy(tmp_path / "kaggle" / "Data_Entry_2017.csv", data)
    for sub in ("images_001", "images_002"):
        (data / sub).symlink_to(tmp_path / "kaggle" / sub, target_is_directory=True)
    meta = fedxray.load_nih(data)
    assert [os.path.basename(p) for p in meta["path"]] == names
    assert all(p.startswith(str(data)) for p in meta["path"])


def test_link_loops_and_two_routes_index_each_image_once(tmp_path):
    names = [f"{p:08d}_000.png" for p in range(1, 5)]
    _tiny_dataset(tmp_path, names)
    (tmp_path / "images_001" / "images" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "images_003").symlink_to(tmp_path / "images_002", target_is_directory=True)
    # A file link: the very same file by a second route, not a second copy.
    (tmp_path / "images_001" / "images" / names[1]).symlink_to(tmp_path / "images_002" / "images" / names[1])
    index = fedxray.index_images(tmp_path)
    assert sorted(index) == names
    assert index[names[1]] == tmp_path / "images_001" / "images" / names[1]   # first route, sorted


def test_the_same_name_in_two_different_files_is_still_an_error(tmp_path):
    _png(tmp_path / "a" / "00000001_000.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "b" / "00000001_000.png", np.ones((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"'00000001_000\.png' found twice"):
        fedxray.index_images(tmp_path)


def test_find_csv_follows_linked_folders_once(tmp_path):
    from fedxray.data import _find_files
    elsewhere = tmp_path / "elsewhere" / "data"
    elsewhere.mkdir(parents=True)
    (elsewhere / "Data_Entry_2017.csv").write_text(KAGGLE_HEADER + "\n")
    root = tmp_path / "input"
    root.mkdir()
    (root / "nih").symlink_to(elsewhere, target_is_directory=True)
    (root / "other").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(root, target_is_directory=True)
    assert find_csv(search_root=root) == root / "nih" / "Data_Entry_2017.csv"
    assert _find_files(root, "Data_Entry_2017*.csv", max_depth=4) == [root / "nih" / "Data_Entry_2017.csv"]


def _listed_dataset(tmp_path, train_val: str, test: str):
    names = [f"{p:08d}_000.png" for p in range(1, 7)]
    _tiny_dataset(tmp_path, names)
    (tmp_path / "train_val_list.txt").write_text(train_val)
    (tmp_path / "test_list.txt").write_text(test)
    return fedxray.load_nih(tmp_path)


def test_an_image_in_both_split_lists_is_an_error(tmp_path):
    tv = "".join(f"{p:08d}_000.png\n" for p in range(1, 6))
    meta = _listed_dataset(tmp_path, tv, "00000005_000.png\n00000006_000.png\n00000004_000.png\n")
    with pytest.raises(DataError, match=r"2 image\(s\) are in both .*train_val_list\.txt and "
                                        r".*test_list\.txt \(first: 00000004_000\.png, "
                                        r"00000005_000\.png\).*Re-download"):
        fedxray.split_by_patient(meta)


@pytest.mark.parametrize("which", ["test_list.txt", "train_val_list.txt"])
def test_an_empty_split_list_is_an_error(tmp_path, which):
    tv, te = "00000001_000.png\n00000002_000.png\n", "00000006_000.png\n"
    meta = _listed_dataset(tmp_path, "\n" if which == "train_val_list.txt" else tv,
                           "\n \n" if which == "test_list.txt" else te)
    with pytest.raises(DataError, match=rf"{which} lists no images.*remove both lists"):
        fedxray.split_by_patient(meta)


def test_a_split_list_that_is_not_a_list_of_names_is_an_error(tmp_path):
    meta = _listed_dataset(tmp_path, "00000001_000.png\n", "00000006_000.png\n")
    (tmp_path / "test_list.txt").write_text((tmp_path / "Data_Entry_2017.csv").read_text())
    with pytest.raises(DataError, match=r"test_list\.txt: 7 of 7 line\(s\) are not image names, "
                                        r"first line 1: 'Image Index,Finding Labels.*CSV given by mistake"):
        fedxray.split_by_patient(meta)
    (tmp_path / "test_list.txt").write_text("00000006_000.png\nimages_001/images/00000005_000.png\n")
    with pytest.raises(DataError, match=r"1 of 2 line\(s\) .*first line 2: 'images_001/images/"):
        fedxray.split_by_patient(meta)
    (tmp_path / "test_list.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(DataError, match=r"test_list\.txt is not a text file"):
        fedxray.split_by_patient(meta)


def test_a_seeded_split_says_so(tiny_nih, caplog):
    import logging
    meta = fedxray.load_nih(tiny_nih)
    meta.attrs = {}                                       # e.g. after a CSV round trip
    with caplog.at_level(logging.INFO, logger="fedxray.data"):
        fedxray.split_by_patient(meta, seed=0)
    assert "seeded split" in caplog.text and "test_list.txt" in caplog.text
