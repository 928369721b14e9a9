"""Each hospital's own test patients, personalization (fine-tuning, FedPer, FedBN) and the
model-by-site matrix."""
import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import fedxray
from fedxray import LABELS, Config
from fedxray.checkpoint import CheckpointError
from fedxray.crosssite import eval_matrix, own_site_gain
from fedxray.device import predict
from fedxray.federated import run_federated, run_finetuned, run_local_only
from fedxray.model import exchanged_keys, get_state, local_keys_of
from fedxray.parts import prepare

from conftest import write_tiny_nih


@pytest.fixture(scope="module")
def site_splits(tmp_path_factory):
    data = write_tiny_nih(tmp_path_factory.mktemp("sites"), num_patients=30)
    return fedxray.split_by_patient(fedxray.load_nih(data), val_fraction=0.2, seed=0)


def _config(**kw):
    base = dict(num_clients=2, num_rounds=1, batch_size=8, image_size=64, weights=None, preload=True,
                progress=False, eval_batch_size=64, site_test_fraction=0.3, test_every_round=False)
    return Config(**{**base, **kw})


def _sklearn_mean_auroc(y, p) -> float:
    scored = [roc_auc_score(y[:, j], p[:, j]) for j in range(len(LABELS)) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean(scored))


def test_every_model_is_scored_on_every_site_and_the_pooled_test(site_splits, tmp_path):
    cfg = _config()
    parts = prepare(cfg, site_splits)
    assert [len(t) for t in parts.site_tests] and all(len(t) for t in parts.site_tests)
    fedavg = run_federated(cfg, site_splits, tmp_path / "fedavg", parts=parts)
    start = get_state(fedavg.model, parts.keys)
    local = run_local_only(cfg, site_splits, tmp_path / "local", parts=parts)
    tuned = run_finetuned(cfg, site_splits, tmp_path / "tuned", start_state=start, epochs=1, parts=parts)
    fedper = run_federated(dataclasses.replace(cfg, local_keys="fc"), site_splits, tmp_path / "fedper", parts=parts)
    matrix, long = eval_matrix({"fedavg": fedavg.history}, {"fedavg + fine-tuning": tuned, "fedper": fedper.history},
                               local)

    assert list(matrix.index) == ["fedavg", "fedavg + fine-tuning", "fedper", "local-only 0", "local-only 1"]
    assert list(matrix.columns) == ["site 0", "site 1", "pooled"]
    assert np.isnan(matrix.loc["fedavg + fine-tuning", "pooled"])          # no single model to score there
    assert matrix.drop(index="fedavg + fine-tuning").notna().all().all()
    assert matrix.loc["fedavg + fine-tuning", ["site 0", "site 1"]].notna().all()
    # Oracle: FedAvg's cells are sklearn's mean AUROC of its predictions on each site's own patients.
    parts.model.load_state_dict(start, strict=False)   # (the parts' one model object served every run since)
    for k, data in enumerate(parts.site_test_data):
        p, y = predict(parts.model, data, 64, parts.device)
        assert matrix.loc["fedavg", f"site {k}"] == pytest.approx(_sklearn_mean_auroc(y, p), abs=1e-9)
    # The per-finding values behind each cell: 14 findings + the mean, per model and column.
    cell = long[(long.model == "local-only 1") & (long.column == "site 0")]
    assert set(cell.metric) == {"mean_auroc", *(f"auroc_{f}" for f in LABELS)}
    # Fine-tuning starts from FedAvg's model: its round 0 is FedAvg's reported model, to the digit.
    fedavg_val = fedavg.history.query("split == 'val' and client == 'global' and metric == 'mean_auroc'")
    reported = fedxray.reported_round(fedavg.history)
    for k in ("0", "1"):
        before = tuned.query("split == 'val' and client == @k and metric == 'mean_auroc' and round == 0")
        assert before["value"].item() == fedavg_val[fedavg_val["round"] == reported]["value"].item()
    gain = own_site_gain(matrix, "fedavg", "local-only")
    assert gain["site 1"] == pytest.approx(matrix.loc["fedavg", "site 1"] - matrix.loc["local-only 1", "site 1"])

    # The fine-tuning's start is one of its inputs: another start state is refused, not read back.
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in start.items()}
    with pytest.raises(CheckpointError, match="start_state"):
        run_finetuned(cfg, site_splits, tmp_path / "tuned", start_state=other, epochs=1, parts=parts)


def test_fedper_keeps_each_head_at_its_site(site_splits, tmp_path):
    cfg = _config(local_keys="fc", site_test_fraction=0.0, num_rounds=2)
    parts = prepare(cfg, site_splits)
    fc = [k for k in parts.model.state_dict() if k.startswith("fc.")]
    assert set(local_keys_of(parts.model, "fc")) == set(fc) and not set(parts.keys) & set(fc)
    initial = {k: parts.initial[k].clone() for k in fc}
    run = fedxray.federated.FederatedRun(parts, tmp_path)
    run.run()
    heads = [cl.local_state for cl in run.clients]
    assert set(heads[0]) == set(fc)
    for k in fc:   # each site trained its own head; none of them travelled
        assert not torch.equal(heads[0][k], heads[1][k]) and not torch.equal(heads[0][k], initial[k])
    assert not set(run.global_state) & set(fc)
    h = run.history()
    assert sorted(h[(h.split == "val") & (h.metric == "mean_auroc") & (h["round"] == 2)].client) == ["0", "1", "global"]
    sent = h[h.metric == "bytes_sent"]["value"].iloc[0]
    assert sent == 2 * sum(v.numel() * v.element_size() for k, v in parts.initial.items() if k not in fc)
    # The saved run gives each site its own head back.
    site1 = fedxray.load_model(tmp_path / "final_model.pt", client=1)
    for k in fc:
        assert torch.equal(site1.state_dict()[k], heads[1][k])


def test_finetuning_refuses_what_it_cannot_do(site_splits, tmp_path):
    cfg = _config()
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        run_finetuned(cfg, site_splits, tmp_path, start_state={}, epochs=0)
    with pytest.raises(ValueError, match="personalized already"):
        run_finetuned(_config(local_keys="bn"), site_splits, tmp_path, start_state={}, epochs=1)
    parts = prepare(cfg, site_splits)
    with pytest.raises(CheckpointError, match="the start state does not fit"):
        run_finetuned(cfg, site_splits, tmp_path, start_state={"fc.weight": torch.zeros(3)}, epochs=1, parts=parts)


def test_the_matrix_needs_site_tests():
    from fedxray import history as hist
    rows = [hist.row(1, "test", "global", "mean_auroc", 0.7), hist.row(1, "val", "global", "selected_round", 1)]
    with pytest.raises(ValueError, match="site_test_fraction > 0"):
        eval_matrix({"fedavg": hist.frame(rows)})
    with pytest.raises(ValueError, match="no model given"):
        eval_matrix()
