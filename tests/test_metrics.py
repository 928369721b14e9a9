import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedxray.metrics import auroc_per_finding, mean_auroc


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


@pytest.mark.parametrize("y, s, message", [
    (np.zeros((4, 3)), np.zeros((4, 2)), "y_true has shape (4, 3) but y_score has shape (4, 2)"),
    (np.zeros(4), np.zeros(4), "must be 2-D [samples, findings], got shapes (4,) and (4,)"),
    (np.zeros((3, 2)), np.array([[0.1, 0.2], [np.nan, 0.3], [0.5, 0.6]]),
     "y_score has 1 non-finite value(s), first nan at row 1, column 0"),
    (np.array([[0, 1], [2, 0]]), np.zeros((2, 2)), "only 0 and 1, found 2 at row 1, column 0"),
    (np.array([[0, 0.5]]), np.zeros((1, 2)), "found 0.5 at row 0, column 1"),
    (np.array([["a", "b"]]), np.zeros((1, 2)), "y_true must be numeric"),
])
def test_errors_name_the_problem(y, s, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        auroc_per_finding(y, s)
