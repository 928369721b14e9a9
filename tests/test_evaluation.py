"""Patient-level bootstrap intervals, paired differences, calibration error and NIH's box file."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import fedxray
from fedxray import LABELS, DataError, bootstrap_auroc, expected_calibration_error, paired_bootstrap, read_boxes

from conftest import ROOT

SHARED = ROOT.parent / "shared"


def _sample(patients: int, per_patient: int = 3, findings: int = 3, seed: int = 0, signal: float = 1.0):
    """Images of `patients` patients whose labels and scores share a patient effect."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(patients), per_patient)
    base = rng.normal(size=(patients, findings))[ids]
    y = (base + rng.normal(scale=0.7, size=base.shape) > 0.8).astype(int)
    score = signal * y + rng.normal(size=y.shape) + 0.5 * base
    return y, score, ids


def test_bootstrap_estimate_is_sklearns_auroc_and_the_interval_contains_it():
    y, s, ids = _sample(150)
    names = ["a", "b", "c"]
    table = bootstrap_auroc(y, s, ids, n_boot=300, seed=1, labels=names)
    assert list(table.index) == names + ["mean"]
    for j, name in enumerate(names):
        assert table.loc[name, "estimate"] == pytest.approx(roc_auc_score(y[:, j], s[:, j]), abs=1e-12)
    assert table.loc["mean", "estimate"] == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)]))
    assert (table["lower"] < table["estimate"]).all() and (table["estimate"] < table["upper"]).all()
    assert (table["n_boot"] == 300).all()
    again = bootstrap_auroc(y, s, ids, n_boot=300, seed=1, labels=names)
    pd.testing.assert_frame_equal(table, again)                           # seeded


def test_ties_count_one_half_as_in_sklearn():
    y = np.array([[0], [1], [1], [0], [1], [0]])
    s = np.array([[0.5], [0.5], [0.9], [0.1], [0.5], [0.5]])
    table = bootstrap_auroc(y, s, np.arange(6), n_boot=10, labels=["x"])
    assert table.loc["x", "estimate"] == pytest.approx(roc_auc_score(y[:, 0], s[:, 0]), abs=1e-15)


def test_more_patients_give_a_narrower_interval():
    small = bootstrap_auroc(*_sample(60, seed=2), n_boot=400, labels=["a", "b", "c"])
    large = bootstrap_auroc(*_sample(1200, seed=2), n_boot=400, labels=["a", "b", "c"])
    width = lambda t: t["upper"] - t["lower"]   # noqa: E731
    assert (width(large) < width(small) / 2).all(), (width(small), width(large))   # ~1/sqrt(20)


def test_it_resamples_patients_not_images():
    """Duplicating every image of every patient (same patients) leaves every replicate, hence the
    interval, unchanged; an image-level bootstrap would narrow it by about 1/sqrt(2)."""
    y, s, ids = _sample(200, seed=3)
    once = bootstrap_auroc(y, s, ids, n_boot=300, seed=4, labels=["a", "b", "c"])
    twice = bootstrap_auroc(np.repeat(y, 2, axis=0), np.repeat(s, 2, axis=0), np.repeat(ids, 2), n_boot=300,
                            seed=4, labels=["a", "b", "c"])
    pd.testing.assert_frame_equal(once, twice, rtol=1e-12, atol=1e-12)
    # The same images as 400 independent "patients" do narrow it: the patient is what matters.
    apart = bootstrap_auroc(np.repeat(y, 2, axis=0), np.repeat(s, 2, axis=0), np.arange(len(ids) * 2), n_boot=300,
                            seed=4, labels=["a", "b", "c"])
    assert ((apart["upper"] - apart["lower"]) < (once["upper"] - once["lower"])).all()


def test_a_finding_without_positives_is_nan_and_left_out_of_the_mean():
    y, s, ids = _sample(100, seed=5)
    y[:, 1] = 0
    table = bootstrap_auroc(y, s, ids, n_boot=100, labels=["a", "b", "c"])
    assert np.isnan(table.loc["b", "estimate"]) and table.loc["b", "n_boot"] == 0
    assert table.loc["mean", "estimate"] == pytest.approx(table.loc[["a", "c"], "estimate"].mean())


def test_paired_difference_of_a_model_with_itself_is_exactly_zero_and_a_real_gap_excludes_zero():
    y, s, ids = _sample(300, seed=6)
    same = paired_bootstrap(y, s, s, ids, n_boot=200, labels=["a", "b", "c"])
    assert (same[["estimate", "lower", "upper"]].to_numpy() == 0).all()
    noisy = s + np.random.default_rng(7).normal(scale=2.0, size=s.shape)   # a worse model
    gap = paired_bootstrap(y, s, noisy, ids, n_boot=300, labels=["a", "b", "c"])
    assert (gap["lower"] > 0).all()
    for j, name in enumerate("abc"):
        assert gap.loc[name, "estimate"] == pytest.approx(
            roc_auc_score(y[:, j], s[:, j]) - roc_auc_score(y[:, j], noisy[:, j]), abs=1e-12)


def test_bad_inputs_are_refused_by_name():
    y, s, ids = _sample(20)
    with pytest.raises(ValueError, match="one patient per image"):
        bootstrap_auroc(y, s, ids[:-1], labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_auroc(y, np.where(y > 0, np.nan, s), ids, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="3 columns"):
        bootstrap_auroc(y, s, ids)                                         # LABELS has 14 names
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_auroc(y, s, ids, n_boot=0, labels=["a", "b", "c"])


def test_expected_calibration_error_by_hand():
    # Bins of width 0.5. Finding 0: bin [0, 0.5): p 0.1, 0.2 (mean 0.15), labels 0, 1 (rate 0.5) ->
    # |0.5 - 0.15| = 0.35, weight 2/4; bin [0.5, 1]: p 0.8, 1.0 (0.9), labels 1, 1 (1.0) -> 0.1, weight
    # 2/4. ECE = 0.175 + 0.05 = 0.225. Finding 1: p 0.25 for labels 0, 0 and 0.75 for 1, 1: each bin is
    # off by 0.25 -> 0.25. Finding 2: certain and right -> 0.
    y = np.array([[0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]])
    p = np.array([[0.1, 0.25, 0.0], [0.2, 0.75, 1.0], [0.8, 0.75, 1.0], [1.0, 0.25, 0.0]])
    np.testing.assert_allclose(expected_calibration_error(y, p, n_bins=2), [0.225, 0.25, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error(y, p + 1.0)


def test_read_boxes_reads_nihs_box_file_and_maps_infiltrate():
    path = SHARED / "nih-metadata" / "BBox_List_2017.csv"
    if not path.exists():
        pytest.skip(f"{path} absent (the shared NIH metadata)")
    boxes = read_boxes(path)
    assert len(boxes) == 984 and boxes["image"].nunique() == 880
    assert list(boxes.columns) == ["image", "finding", "x", "y", "w", "h"]
    assert set(boxes["finding"]) <= set(LABELS) and "Infiltration" in set(boxes["finding"])
    assert (boxes["finding"] == "Infiltration").sum() == 123
    assert boxes.loc[0].tolist() == ["00013118_008.png", "Atelectasis", pytest.approx(225.084745762712),
                                     pytest.approx(547.019216763771), pytest.approx(86.7796610169491),
                                     pytest.approx(79.1864406779661)]
    sample = SHARED / "nih-sample"
    if sample.exists():
        images = set(fedxray.load_nih(sample)["image"])
        assert len(set(read_boxes(sample / "BBox_List_2017.csv")["image"]) & images) == 7


@pytest.mark.parametrize("line, match", [
    ("00000001_000.png,Pneumothrax,1,2,3,4", r"line 2: finding 'Pneumothrax' is not one of"),
    ("00000001_000.png,Mass,1,2,three,4", r"line 2: the box .* is not four numbers"),
    ("00000001_000.png,Mass,1,2,0,4", r"line 2: the box .* width and height > 0"),
    ("00000001_000.png,Mass,1,2", r"line 2: expected image, finding, x, y, w, h"),
])
def test_read_boxes_refuses_a_bad_row_naming_file_line_and_value(tmp_path, line, match):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n" + line + "\n")
    with pytest.raises(DataError, match=match) as err:
        read_boxes(path)
    assert str(path) in str(err.value)


def test_read_boxes_refuses_another_file(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("Image Index,Finding Labels,Follow-up #\nx.png,Mass,0\n")
    with pytest.raises(DataError, match="BBox_List_2017"):
        read_boxes(path)
    with pytest.raises(FileNotFoundError, match="BBox_List_2017"):
        read_boxes(Path(tmp_path / "missing.csv"))


def test_reliability_table_gives_the_pooled_ece():
    rng = np.random.default_rng(8)
    p = rng.random((500, 3))
    y = (rng.random((500, 3)) < p ** 2).astype(int)                      # overconfident
    table = fedxray.evaluation.reliability(y, p, n_bins=10)
    assert table["count"].sum() == y.size
    used = table[table["count"] > 0]
    pooled = float((used["count"] / y.size * (used["positive_rate"] - used["mean_prob"]).abs()).sum())
    assert pooled == pytest.approx(expected_calibration_error(y.reshape(-1, 1), p.reshape(-1, 1))[0], abs=1e-12)
    from fedxray import plots
    fig = plots.plot_reliability(table)
    assert f"ECE {pooled:.3f}" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()][1]


def test_test_predictions_score_as_the_run_scored_its_test_set(tiny_splits, tmp_path):
    """The predictions the intervals are built on are those behind the history's test AUROC."""
    from fedxray.federated import test_predictions
    from fedxray.metrics import auroc_per_finding, mean_auroc
    from fedxray.parts import prepare
    from fedxray.saved_model import load_final
    config = fedxray.Config(num_clients=2, num_rounds=1, batch_size=8, image_size=64, weights=None, progress=False,
                            eval_batch_size=64, seed=0)
    parts = prepare(config, tiny_splits)
    h = fedxray.run_federated(config, tiny_splits, tmp_path / "run", parts=parts).history
    saved = load_final(tmp_path / "run" / "final_model.pt")
    probs, labels = test_predictions(parts, saved["state"], saved["local_states"])
    assert len(probs) == len(parts.splits["test"])
    final = h[(h.split == "test") & (h.metric == "mean_auroc") & (h.client == "global")]["value"].iloc[-1]
    assert mean_auroc(auroc_per_finding(labels, probs)) == pytest.approx(final, abs=1e-6)
    table = bootstrap_auroc(labels, probs, parts.splits["test"]["patient_id"].to_numpy(), n_boot=50)
    assert table.loc["mean", "estimate"] == pytest.approx(final, abs=1e-6)
