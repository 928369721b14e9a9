"""The comparison under several seeds: mean and spread per method."""
import numpy as np
import pandas as pd
import pytest

from fedxray import Config
from fedxray import history as hist
from fedxray.seeds import reported_test_auroc, run_seeds, seed_summary


def test_each_seed_trains_its_own_runs_and_the_summary_is_numpy_s(tiny_splits, tmp_path):
    cfg = Config(num_clients=2, num_rounds=1, batch_size=8, image_size=64, weights=None, preload=True, progress=False,
                 eval_batch_size=64, test_every_round=False)
    # The main seed's runs are given (here: a stand-in history); they are read, not trained again.
    done = {"fedavg": hist.frame([hist.row(1, "test", "global", "mean_auroc", 0.5),
                                  hist.row(1, "val", "global", "selected_round", 1)])}
    scores = run_seeds(cfg, tiny_splits, tmp_path, [0, 1, 2], done=done, baselines=False)
    assert list(scores["seed"]) == [0, 1, 2] and set(scores["method"]) == {"fedavg"}
    assert scores.loc[0, "test mean AUROC"] == 0.5 and not (tmp_path / "seed_0").exists()
    for s in (1, 2):
        h = pd.read_csv(tmp_path / f"seed_{s}" / "fedavg" / "history.csv", dtype={"client": str})
        assert scores.loc[s, "test mean AUROC"] == pytest.approx(reported_test_auroc(h))
        assert (tmp_path / f"seed_{s}" / "fedavg" / "config.json").read_text().count(f'"seed": {s}') == 1
    summary = seed_summary(scores)
    values = scores["test mean AUROC"].to_numpy()
    assert summary.loc["fedavg", "seeds"] == 3
    assert summary.loc["fedavg", "mean"] == pytest.approx(values.mean())
    assert summary.loc["fedavg", "std"] == pytest.approx(np.std(values, ddof=1))
    assert (summary.loc["fedavg", "min"], summary.loc["fedavg", "max"]) == (values.min(), values.max())


def test_seeds_must_be_distinct_integers(tiny_splits, tmp_path):
    for bad in ([], [1, 1], [0.5], [True]):
        with pytest.raises(ValueError, match="seed"):
            run_seeds(Config(), tiny_splits, tmp_path, bad)
