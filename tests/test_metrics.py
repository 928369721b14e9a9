import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import fedxray
from fedxray import Config, run_federated
from fedxray.federated import FederatedRun
from fedxray.metrics import auprc_per_finding, auroc_per_finding, mean_auprc, mean_auroc, nanmean_scored
from fedxray.parts import prepare


def random_labels_scores(n: int = 200, c: int = 14, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.linspace(0.02, 0.5, c)).astype(np.uint8)
    s = rng.random((n, c)) + 0.5 * y  # informative but imperfect scores
    return y, s.astype(np.float32)


def test_equals_sklearn_column_by_column():
    y, s = random_labels_scores()
    out = auroc_per_finding(y, s)
    assert out.shape == (14,) and out.dtype == np.float64
    for j in range(14):
        assert out[j] == pytest.approx(roc_auc_score(y[:, j], s[:, j]), abs=1e-12)
    expected = [roc_auc_score(y[:, j], s[:, j]) for j in range(14)]
    assert mean_auroc(out) == pytest.approx(np.mean(expected))


def test_torch_tensors_match_numpy():
    y, s = random_labels_scores(c=3)
    from_torch = auroc_per_finding(torch.from_numpy(y).float(), torch.from_numpy(s).to(torch.bfloat16))
    expected = auroc_per_finding(y, torch.from_numpy(s).to(torch.bfloat16).double().numpy())
    np.testing.assert_array_equal(from_torch, expected)
    assert mean_auroc(torch.tensor([0.5, float("nan"), 0.7])) == pytest.approx(0.6)


def test_single_class_column_is_nan_and_excluded_silently():
    y, s = random_labels_scores(c=4)
    y[:, 1] = 0  # no positives
    y[:, 3] = 1  # no negatives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = auroc_per_finding(y, s)
        m = mean_auroc(out)
    assert np.isnan(out[1]) and np.isnan(out[3])
    assert not np.isnan(out[[0, 2]]).any()
    assert m == pytest.approx((roc_auc_score(y[:, 0], s[:, 0]) + roc_auc_score(y[:, 2], s[:, 2])) / 2)


def test_all_nan_gives_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = auroc_per_finding(np.zeros((5, 14)), np.random.default_rng(0).random((5, 14)))
        assert np.isnan(out).all()
        assert np.isnan(mean_auroc(out))
        assert np.isnan(mean_auroc([]))
        assert np.isnan(auroc_per_finding(np.zeros((0, 2)), np.zeros((0, 2)))).all()


def test_perfect_and_inverted_scores():
    y = np.array([[0, 1], [0, 1], [1, 0], [1, 0]])
    s = np.array([[0.1, 0.1], [0.2, 0.2], [0.8, 0.8], [0.9, 0.9]])
    np.testing.assert_array_equal(auroc_per_finding(y, s), [1.0, 0.0])


def test_auprc_equals_sklearn_with_single_class_columns_nan_and_silent():
    y, s = random_labels_scores()
    y[:, 2] = 0  # no positives: no average precision
    y[:, 5] = 1  # no negatives: sklearn says 1.0 whatever the scores; NaN here, as for AUROC
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = auprc_per_finding(y, s)
        m = mean_auprc(out)
    assert out.shape == (14,) and out.dtype == np.float64
    assert np.isnan(out[[2, 5]]).all() and average_precision_score(y[:, 5], s[:, 5]) == 1.0
    expected = {j: average_precision_score(y[:, j], s[:, j]) for j in range(14) if j not in (2, 5)}
    for j, ap in expected.items():
        assert out[j] == pytest.approx(ap, abs=1e-12)
    assert m == pytest.approx(np.mean(list(expected.values())))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(auroc_per_finding(y, s)))   # same findings scored


def test_auprc_follows_prevalence_where_auroc_does_not():
    rng = np.random.default_rng(0)
    s = rng.random((4000, 2))                                      # scores that know nothing
    y = (rng.random((4000, 2)) < [0.03, 0.18]).astype(int)          # Pneumothorax-, Effusion-like rates
    assert auroc_per_finding(y, s) == pytest.approx([0.5, 0.5], abs=0.05)
    assert auprc_per_finding(y, s) == pytest.approx(y.mean(axis=0), abs=0.02)


def test_means_share_one_nan_skipping_mean():
    values = [0.5, float("nan"), 0.7]
    assert mean_auroc(values) == mean_auprc(values) == nanmean_scored(values) == pytest.approx(0.6)
    assert np.isnan(mean_auprc([float("nan")])) and np.isnan(nanmean_scored([]))


@pytest.mark.parametrize("per_finding", [auroc_per_finding, auprc_per_finding])
@pytest.mark.parametrize("y, s, message", [
    (np.zeros((4, 3)), np.zeros((4, 2)), "y_true has shape (4, 3) but y_score has shape (4, 2)"),
    (np.zeros(4), np.zeros(4), "must be 2-D [samples, findings], got shapes (4,) and (4,)"),
    (np.zeros((3, 2)), np.array([[0.1, 0.2], [np.nan, 0.3], [0.5, 0.6]]),
     "y_score has 1 non-finite value(s), first nan at row 1, column 0"),
    (np.array([[0, 1], [2, 0]]), np.zeros((2, 2)), "only 0 and 1, found 2 at row 1, column 0"),
    (np.array([[0, 0.5]]), np.zeros((1, 2)), "found 0.5 at row 0, column 1"),
    (np.array([["a", "b"]]), np.zeros((1, 2)), "y_true must be numeric"),
])
def test_errors_name_the_problem(y, s, message, per_finding):
    with pytest.raises(ValueError, match=re.escape(message)):
        per_finding(y, s)


def test_history_mean_auprc_is_pooled_and_matches_sklearn(tiny_splits, tmp_path):
    cfg = Config(num_clients=2, num_rounds=1, batch_size=8, lr=1e-3, image_size=64, weights=None,
                 preload=True, progress=False, eval_batch_size=64, seed=0)
    res = run_federated(cfg, tiny_splits, tmp_path)
    run = FederatedRun(prepare(cfg, tiny_splits), tmp_path / "x")
    run.model.load_state_dict(res.model.state_dict())
    probs, labels = fedxray.device.predict(run.model, run.parts.test_data, 64, torch.device("cpu"))
    expected = [average_precision_score(labels[:, j], probs[:, j]) if 0 < labels[:, j].sum() < len(labels)
                else np.nan for j in range(14)]
    assert not np.isnan(expected).all()
    h = res.history
    test = h[(h.split == "test") & (h.client == "global") & (h["round"] == 1)].set_index("metric")["value"]
    assert test["mean_auprc"] == pytest.approx(np.nanmean(expected), abs=1e-6)
    got = [test[f"auprc_{n}"] for n in fedxray.LABELS]
    np.testing.assert_allclose(got, expected, atol=1e-6, equal_nan=True)
