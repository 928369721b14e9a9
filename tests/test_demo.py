import json
from dataclasses import asdict
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import fedxray
from fedxray import demo
from fedxray.data import LABELS, DataError, read_metadata, split_by_patient

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
NIH_CSV = SHARED / "nih-metadata" / "Data_Entry_2017.csv"
SMALL = dict(num_patients=24, image_size=64, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return fedxray.make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=3, **SMALL)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kaggle_layout_and_csv_flavour(small):
    lines = (small / "Data_Entry_2017.csv").read_text().split("\n")
    assert lines[0] == ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
                        "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    assert lines[-1] == "" and all(lines[1:-1])
    raw = pd.read_csv(small / "Data_Entry_2017.csv")
    assert list(raw.columns)[-1] == "Unnamed: 11" and raw["Unnamed: 11"].isna().all()
    for col in ("Follow-up #", "Patient ID", "Patient Age", "OriginalImage[Width", "Height]"):
        assert pd.api.types.is_integer_dtype(raw[col]), col
    assert set(raw["View Position"]) <= {"AP", "PA"} and set(raw["Patient Gender"]) <= {"M", "F"}
    for name, fu, pid in zip(raw["Image Index"], raw["Follow-up #"], raw["Patient ID"]):
        assert name == f"{pid:08d}_{fu:03d}.png"

    pngs = sorted(small.glob("images_*/images/*.png"))
    assert len(pngs) == len(raw)
    folders = {p.parent.parent.name for p in pngs}
    assert len(folders) >= 2 and all(re.fullmatch(r"images_\d{3}", f) for f in folders)
    with Image.open(pngs[0]) as img:
        assert img.mode == "L" and img.size == (64, 64)
    lists = [(small / n).read_text().split("\n") for n in ("train_val_list.txt", "test_list.txt")]
    assert sorted(lists[0] + lists[1]) == sorted(raw["Image Index"])


def test_load_nih_and_patient_split(small):
    meta = fedxray.load_nih(small)
    assert len(meta) == len(list(small.glob("images_*/images/*.png")))
    parts = split_by_patient(meta)
    test_names = set((small / "test_list.txt").read_text().split("\n"))
    assert set(parts["test"]["image"]) == test_names
    pats = [set(parts[k]["patient_id"]) for k in ("train", "val", "test")]
    assert not (pats[0] & pats[1] or pats[0] & pats[2] or pats[1] & pats[2])
    assert len(pats[2]) == round(0.2 * SMALL["num_patients"])


def test_several_images_per_patient_and_both_views(small):
    meta = read_metadata(small / "Data_Entry_2017.csv")
    per_patient = meta.groupby("patient_id").size()
    assert per_patient.max() > 1 and per_patient.min() >= 1 and per_patient.max() <= 8
    assert set(meta["view"]) == {"AP", "PA"}


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    kw = dict(num_patients=6, image_size=48, progress=False)
    a = all_files(fedxray.make_demo_dataset(tmp_path / "a", seed=7, **kw))
    b = all_files(fedxray.make_demo_dataset(tmp_path / "b", seed=7, **kw))
    c = all_files(fedxray.make_demo_dataset(tmp_path / "c", seed=8, **kw))
    assert a == b
    assert a != c
    shared_pngs = [k for k in set(a) & set(c) if k.endswith(".png")]
    assert shared_pngs and any(a[k] != c[k] for k in shared_pngs)


def test_second_call_keeps_the_dataset(tmp_path, monkeypatch):
    out = fedxray.make_demo_dataset(tmp_path / "d", num_patients=5, image_size=48, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def must_not_write(*args):
        raise AssertionError("a complete dataset was rewritten")
    monkeypatch.setattr(demo, "_write_png", must_not_write)
    assert fedxray.make_demo_dataset(tmp_path / "d", num_patients=5, image_size=48) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    written = []
    real = demo._write_png

    def fail_after_three(path, image):
        if len(written) == 3:
            raise OSError("disk full")
        written.append(path)
        real(path, image)
    monkeypatch.setattr(demo, "_write_png", fail_after_three)
    with pytest.raises(OSError, match="disk full"):
        fedxray.make_demo_dataset(tmp_path / "d", num_patients=5, image_size=48, progress=False)
    assert not (tmp_path / "d").exists()
    assert list(tmp_path.iterdir()) == []      # the temporary sibling is gone too
    assert not demo.is_demo_dataset(tmp_path / "d")


def test_refuses_to_overwrite_foreign_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a fedxray demo dataset"):
        fedxray.make_demo_dataset(out, num_patients=5, image_size=48, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_empty_folder_is_filled_and_other_parameters_replace_a_demo(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    fedxray.make_demo_dataset(out, num_patients=5, image_size=48, progress=False)
    assert json.loads((out / demo.MANIFEST_NAME).read_text())["params"]["num_patients"] == 5
    fedxray.make_demo_dataset(out, num_patients=7, image_size=48, progress=False)
    manifest = json.loads((out / demo.MANIFEST_NAME).read_text())
    assert manifest["params"]["num_patients"] == 7
    assert len(list(out.glob("images_*/images/*.png"))) == manifest["num_images"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_labelled_synthetic(small, tmp_path):
    assert fedxray.is_demo_dataset(small)
    assert fedxray.is_demo_dataset(small / "Data_Entry_2017.csv")
    assert "SYNTHETIC" in (small / "README.txt").read_text()
    manifest = json.loads((small / demo.MANIFEST_NAME).read_text())
    assert manifest["synthetic"] is True and "SYNTHETIC" in manifest["dataset"]
    assert manifest["fedxray_version"] == fedxray.__version__
    assert not fedxray.is_demo_dataset(tmp_path)
    assert not fedxray.is_demo_dataset(None)
    if (SHARED / "nih-sample").is_dir():
        assert not fedxray.is_demo_dataset(SHARED / "nih-sample")


def test_bad_parameters_are_refused(tmp_path):
    for kw in ({"seed": -1}, {"num_patients": 1}, {"test_fraction": 1.0}, {"test_fraction": 0.0},
               {"image_size": 8.5}):
        with pytest.raises(ValueError):
            fedxray.make_demo_dataset(tmp_path / "x", progress=False, **kw)
    assert not (tmp_path / "x").exists()


def test_every_finding_in_default_size_dataset():
    # The metadata draw alone (no images): what make_demo_dataset() writes with the defaults.
    for seed in (0, 1):
        meta = demo._sample_patients(asdict(demo.DemoParams(seed=seed)))
        labels = meta.attrs["combos"][meta["combo"].to_numpy()]
        assert 1000 <= len(meta) <= 1500
        assert (labels.sum(0) >= 40).all(), dict(zip(LABELS, labels.sum(0)))
        assert (labels[meta["test"].to_numpy()].sum(0) >= 5).all()
        assert 0.3 < (meta["view"] == "AP").mean() < 0.5


def test_every_finding_changes_the_image():
    ex = demo.finding_examples(image_size=64)
    assert list(ex) == ["No Finding", *LABELS]
    base = ex["No Finding"].astype(int)
    for name in LABELS:
        assert ex[name].shape == (64, 64) and ex[name].dtype == np.uint8
        assert np.abs(ex[name].astype(int) - base).max() > 40, name


def test_shipped_label_stats_are_sane():
    stats = demo.load_label_stats()
    assert list(stats.columns) == ["finding_labels", "count", "n_pa", "n_ap"]
    assert (stats["count"] == stats["n_pa"] + stats["n_ap"]).all()
    assert stats["finding_labels"].is_unique and stats["count"].is_monotonic_decreasing
    names = {n for s in stats["finding_labels"] for n in s.split("|")}
    assert names == set(LABELS) | {"No Finding"}
    combos, probs = demo.combination_weights(stats)
    assert np.isclose(probs.sum(), 1.0) and (combos.T @ probs >= 0.05).all()
    _, nih = demo.combination_weights(stats, min_prevalence=0.0)
    assert np.allclose(nih, stats["count"] / stats["count"].sum())


@pytest.mark.skipif(not NIH_CSV.is_file(), reason=f"real NIH metadata not present at {NIH_CSV}")
def test_shipped_label_stats_match_nih_metadata():
    pd.testing.assert_frame_equal(demo.derive_label_stats(NIH_CSV), demo.load_label_stats())


def test_a_damaged_demo_file_is_regenerated_not_reused(tmp_path, caplog):
    out = fedxray.make_demo_dataset(tmp_path / "d", num_patients=5, image_size=48, progress=False)
    png = sorted(out.glob("images_*/images/*.png"))[2]
    good = png.read_bytes()
    png.write_bytes(good[:-8] + bytes(8))                 # the tail of one file damaged
    fedxray.make_demo_dataset(out, num_patients=5, image_size=48, progress=False)
    assert png.read_bytes() == good
    assert "differs from its manifest" in caplog.text
    caplog.clear()
    fedxray.make_demo_dataset(out, num_patients=5, image_size=48, progress=False)   # intact: kept
    assert "differs" not in caplog.text


def test_smallest_demo_has_a_test_patient_and_splits(tmp_path):
    out = fedxray.make_demo_dataset(tmp_path / "d", num_patients=2, image_size=48, progress=False)
    splits = fedxray.split_by_patient(fedxray.load_nih(out), val_fraction=0.0)
    assert splits["test"]["patient_id"].nunique() == 1 and len(splits["train"]) > 0
