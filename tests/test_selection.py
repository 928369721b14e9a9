"""Model selection by validation: the round a hand-made validation history says is the one reported,
tested once and saved, in both rules, through a resume, and read back by the tables."""
import math

import pandas as pd
import pytest
import torch

import fedxray
from conftest import run_interrupted
from fedxray import Config, history as hist, run_federated
from fedxray.federated import CHECKPOINT
from fedxray.checkpoint import load_checkpoint
from fedxray.plots import final_test_auroc
from fedxray.runs import _scores
from fedxray.saved_model import load_model
from fedxray.selection import SELECTED, BestRound, reported_round


def _rows(r, auroc):
    return [hist.row(r, "val", hist.GLOBAL, "loss", 0.5), hist.row(r, "val", hist.GLOBAL, "mean_auroc", auroc)]


def _state(v):
    return {"w": torch.full((2,), float(v))}


def test_best_round_is_the_earliest_highest_validation_auroc():
    best = BestRound("best_val")
    for r, score in enumerate([0.99, 0.6, 0.8, 0.7, 0.8, float("nan")]):   # round 0 is never chosen
        best.offer(r, _rows(r, score), _state(r), {0: _state(10 + r)})
    assert best.round == 2 and best.score == 0.8
    assert torch.equal(best.global_state["w"], _state(2)["w"]) and torch.equal(best.local_states[0]["w"], _state(12)["w"])
    assert best.row(5) == hist.row(5, "val", hist.GLOBAL, SELECTED, 2)

    last = BestRound("last")
    for r, score in enumerate([0.5, 0.9, 0.6]):
        last.offer(r, _rows(r, score), _state(r), {})
    assert last.round == 2

    nan_only = BestRound("best_val")   # no finite validation score at all: the first trained round
    for r in range(3):
        nan_only.offer(r, _rows(r, float("nan")), _state(r), {})
    assert nan_only.round == 1
    with pytest.raises(ValueError, match="select_round must be one of"):
        BestRound("best_test")


def test_reported_round_prefers_the_selection_row_and_falls_back_to_the_last_test_round():
    rows = [hist.row(r, "test", hist.GLOBAL, "mean_auroc", 0.5 + r / 10) for r in range(4)]
    assert reported_round(hist.frame(rows)) == 3                           # an old history: the last test round
    rows.append(hist.row(3, "val", hist.GLOBAL, SELECTED, 1))
    assert reported_round(hist.frame(rows)) == 1


SCORES = {0: 0.5, 1: 0.61, 2: 0.93, 3: 0.72, 4: 0.93}   # hand-made validation mean AUROC by round


@pytest.fixture()
def scripted_validation(monkeypatch):
    """The run's validation mean AUROC replaced by SCORES (test scored as usual), and every call
    of evaluate recorded as (round, split)."""
    real = fedxray.federated.evaluate
    calls = []

    def evaluate(parts, state, round_num, split, clients=()):
        calls.append((round_num, split))
        rows = real(parts, state, round_num, split, clients)
        if split == "val":
            rows = [dict(r, value=SCORES[round_num]) if r["metric"] == "mean_auroc" else r for r in rows]
        return rows
    monkeypatch.setattr(fedxray.federated, "evaluate", evaluate)
    return calls


def _config(**kw):
    base = dict(num_clients=2, num_rounds=4, batch_size=8, lr=1e-3, image_size=64, weights=None, preload=True,
                progress=False, eval_batch_size=64, seed=0, test_every_round=False)
    return Config(**{**base, **kw})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_validation_round_is_tested_once_and_saved(tiny_splits, tmp_path, scripted_validation):
    res = run_federated(_config(), tiny_splits, tmp_path / "run")
    h = res.history
    assert reported_round(h) == 2                                    # 2 and 4 tie: the earlier one
    assert [c for c in scripted_validation if c[1] == "test"] == [(2, "test")]   # test scored once, round 2
    assert sorted(set(hist.select(h, "test")["round"])) == [2]
    assert sorted(set(hist.select(h, "val", "mean_auroc")["round"])) == [0, 1, 2, 3, 4]   # every round kept
    # The saved model is round 2's: the state a 2-round run ends with (the rounds are seeded).
    two = run_federated(_config(num_rounds=2, select_round="last"), tiny_splits, tmp_path / "two").model
    saved = load_model(tmp_path / "run" / "final_model.pt")
    own = {k: v for k, v in saved.state_dict().items() if k.startswith(("layer4.", "fc."))}
    assert _same(own, {k: v for k, v in two.state_dict().items() if k in own})
    assert _same(res.model.state_dict(), saved.state_dict())
    # The tables read the selected round's test scores.
    at2 = h[(h["round"] == 2) & (h.split == "test") & (h.metric == "mean_auroc")]["value"].item()
    assert _scores(h)[0] == 2 and math.isclose(_scores(h)[2], at2)
    per = h[(h["round"] == 2) & (h.split == "test") & h.metric.str.startswith("auroc_")]
    pd.testing.assert_series_equal(final_test_auroc(h), pd.Series(per["value"].to_numpy(), index=list(fedxray.LABELS)),
                                   check_names=False)


def test_rule_last_reports_the_last_round(tiny_splits, tmp_path, scripted_validation):
    h = run_federated(_config(select_round="last"), tiny_splits, tmp_path).history
    assert reported_round(h) == 4 and sorted(set(hist.select(h, "test")["round"])) == [4]


def test_a_resumed_run_keeps_the_best_round_it_saw_before_the_stop(tiny_splits, tmp_path, scripted_validation):
    full = run_federated(_config(), tiny_splits, tmp_path / "full")
    run_interrupted(_config(), tiny_splits, tmp_path / "resumed", at_round=4)
    saved = load_checkpoint(tmp_path / "resumed" / CHECKPOINT)["extra"]["best"]
    assert saved["round"] == 2 and saved["global_state"]              # round 3 is current: round 2's state kept
    resumed = run_federated(_config(), tiny_splits, tmp_path / "resumed")
    pd.testing.assert_frame_equal(full.history, resumed.history)
    assert _same(full.model.state_dict(), resumed.model.state_dict())


def test_a_damaged_selection_entry_is_refused_by_name(tmp_path):
    best = BestRound()
    state = _state(1)
    for bad in ({"round": 7, "score": 0.5, "global_state": {}, "local_states": {}},
                {"round": 1, "score": "high", "global_state": {}, "local_states": {}},
                {"round": 1, "score": 0.5, "global_state": {"w": torch.zeros(3)}, "local_states": {}}):
        with pytest.raises(ValueError, match="ckpt.pt"):
            best.load_state_dict(bad, 3, state, {}, tmp_path / "ckpt.pt")
