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
from fedxray.data import LABELS, DataError, parse_finding_labels, read_metadata, split_by_patient

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
    assert len(pats[2]) == round(demo.DemoParams.test_fraction * SMALL["num_patients"])


def test_several_images_per_patient_and_both_views(small):
    meta = read_metadata(small / "Data_Entry_2017.csv")
    per_patient = meta.groupby("patient_id").size()
    assert per_patient.max() > 1 and per_patient.min() >= 1
    assert per_patient.max() <= demo.DemoParams.max_follow_ups
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
        labels = np.stack(meta["written"].to_numpy())
        test = meta["test"].to_numpy()
        assert 3000 <= len(meta) <= 3600 and 1900 <= test.sum() <= 2300
        assert meta.loc[~test, "patient_id"].nunique() == 492                # the same training size
        assert (labels[~test].sum(0) >= 40).all(), dict(zip(LABELS, labels[~test].sum(0)))
        # Enough test positives for a bootstrap interval of the mean AUROC of about +-0.02.
        assert (labels[test].sum(0) >= 60).all(), dict(zip(LABELS, labels[test].sum(0)))
        assert 0.3 < (meta["view"] == "AP").mean() < 0.5


def test_csv_labels_are_the_drawn_ones_with_a_little_noise():
    params = demo.DemoParams()
    meta = demo._sample_patients(asdict(params))
    drawn = meta.attrs["combos"][meta["combo"].to_numpy()].astype(bool)
    written = np.stack(meta["written"].to_numpy()).astype(bool)
    missed = (drawn & ~written).sum() / drawn.sum()
    spurious = (written & ~drawn).sum() / (~drawn).sum()
    assert 0.5 * params.missed_labels < missed < 1.5 * params.missed_labels
    assert 0 < spurious < 2 * params.spurious_labels
    text = meta["finding_labels"].str.split("|")
    assert all(names == sorted(names) for names in text)                 # NIH's order
    assert (parse_finding_labels(meta["finding_labels"]) == written).all()


def test_follow_ups_keep_their_findings():
    params = demo.DemoParams()
    meta = demo._sample_patients(asdict(params))
    combos = meta.attrs["combos"]
    same_patient = (meta["patient_id"].to_numpy()[1:] == meta["patient_id"].to_numpy()[:-1])
    before, after = meta["combo"].to_numpy()[:-1][same_patient], meta["combo"].to_numpy()[1:][same_patient]
    kept = before == after
    assert abs(kept.mean() - params.persistence) < 0.05
    # A change is one finding appearing or resolving.
    assert ((combos[before[~kept]] != combos[after[~kept]]).sum(1) == 1).all()


def test_follow_ups_share_the_patients_background_and_findings():
    # Two images of one patient differ far less than two patients with the same findings do (the
    # rest is per-image jitter, quantum noise and the fine lung texture, drawn per image).
    labels = np.zeros(len(LABELS), np.uint8)
    labels[LABELS.index("Mass")] = 1

    def image(patient: int, follow_up: int) -> np.ndarray:
        anatomy = demo._Anatomy.draw(demo._stream(0, 2, patient, 0))   # as make_demo_dataset draws it
        return demo._render_image(labels, "PA", anatomy, 0, patient, follow_up, 64).astype(float)
    same = np.abs(image(5, 0) - image(5, 1)).mean()
    other = np.abs(image(5, 0) - image(6, 0)).mean()
    assert same < 0.5 * other, (same, other)


def test_every_finding_changes_the_image():
    ex = demo.finding_examples(image_size=64)
    assert list(ex) == ["No Finding", *LABELS]
    base = ex["No Finding"].astype(int)
    for name in LABELS:
        assert ex[name].shape == (64, 64) and ex[name].dtype == np.uint8
        # Signatures are local structure, some of it faint at 64 px (Pneumonia: 38 gray levels).
        assert np.abs(ex[name].astype(int) - base).max() > 30, name


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


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> Path:
    # The default demo (~3,200 images): about 15 s on 2 cores.
    return fedxray.make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", progress=False)


def test_a_linear_model_on_pixels_reads_little(default_demo):
    # The demo must tell methods apart: raw pixels + logistic regression stays far below what the
    # notebook's network reaches. Measured: 0.643 (FedAvg on a random frozen trunk: 0.784).
    table = demo.linear_probe(default_demo)
    assert list(table.index) == [*LABELS, "mean"]
    assert (table.loc[list(LABELS), "test_positives"] >= 60).all()
    assert table.loc["mean", "auroc"] <= 0.70, table


def test_no_single_pixel_reads_a_finding(default_demo):
    # Measured on train (seed 0): 0.82 Cardiomegaly (an enlarged heart is brightness where lung
    # would be), 0.81 Emphysema (flatter domes), 0.79 or less for every other finding; the first
    # demo's best pixel scored 0.999 for Hernia and 1.000 for Emphysema.
    best = demo.single_pixel_auroc(default_demo)
    assert list(best.index) == list(LABELS)
    assert (best < 0.85).all(), best


def test_single_pixel_auroc_is_the_best_pixels_auroc_by_scikit_learn(tmp_path):
    from sklearn.metrics import roc_auc_score
    from fedxray.data import label_matrix
    data = fedxray.make_demo_dataset(tmp_path / "d", num_patients=40, image_size=48, progress=False)
    train = split_by_patient(fedxray.load_nih(data), val_fraction=0.1, seed=0)["train"]
    pixels, y = demo._pixels(train, 8), label_matrix(train)
    best = demo.single_pixel_auroc(data, size=8)
    for j, name in enumerate(LABELS):
        if 0 < y[:, j].sum() < len(y):
            aucs = [roc_auc_score(y[:, j], pixels[:, i]) for i in range(pixels.shape[1])]
            assert best[name] == pytest.approx(max(max(aucs), 1 - min(aucs)), abs=1e-12), name
        else:
            assert np.isnan(best[name])


def test_the_box_file_is_in_the_manifest_and_counted(small):
    manifest = json.loads((small / demo.MANIFEST_NAME).read_text())
    assert demo.BOX_NAME in manifest["files"]
    boxes = fedxray.read_boxes(small / demo.BOX_NAME)
    counted = boxes["finding"].value_counts()
    assert manifest["test_boxes"] == {name: int(counted.get(name, 0)) for name in demo.BOX_FINDINGS}


def test_a_demo_from_before_the_box_file_is_made_again(tmp_path, caplog):
    out = fedxray.make_demo_dataset(tmp_path / "d", num_patients=5, image_size=48, progress=False)
    path = out / demo.MANIFEST_NAME
    written = (out / demo.BOX_NAME).read_bytes()
    # As generator 2 left it: no box file, and a manifest that does not know one.
    (out / demo.BOX_NAME).unlink()
    old = json.loads(path.read_text())
    old["generator_version"] = 2
    del old["files"][demo.BOX_NAME]
    path.write_text(json.dumps(old))
    fedxray.make_demo_dataset(out, num_patients=5, image_size=48, progress=False)
    assert (out / demo.BOX_NAME).read_bytes() == written
    assert json.loads(path.read_text())["generator_version"] == demo.GENERATOR_VERSION
    assert "older generator" in caplog.text
    # The box file removed from a current dataset: its manifest says so, and it is made again.
    (out / demo.BOX_NAME).unlink()
    fedxray.make_demo_dataset(out, num_patients=5, image_size=48, progress=False)
    assert (out / demo.BOX_NAME).read_bytes() == written
