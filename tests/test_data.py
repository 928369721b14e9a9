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
