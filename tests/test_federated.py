"""Rounds, history, checkpoints, resume, baselines, every strategy in the loop."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import fedxray
from fedxray import LABELS, Config, NonFiniteLossError, run_centralized, run_federated, run_local_only
from fedxray.checkpoint import load_checkpoint
from fedxray.saved_model import load_final
from fedxray.federated import CHECKPOINT, FederatedRun, cap_splits, sample_clients
from fedxray.parts import prepare
from fedxray.plots import local_only_table

from conftest import assert_resume_equals_uninterrupted, run_unfinished


def _config(**kw):
    base = dict(num_clients=2, num_rounds=3, batch_size=8, lr=1e-3, image_size=64, weights=None,
                preload=True, progress=False, eval_batch_size=64, seed=0)
    return Config(**{**base, **kw})


def test_run_writes_history_config_and_checkpoint(tiny_splits, tmp_path):
    res = run_federated(_config(num_rounds=2), tiny_splits, tmp_path)
    h = res.history
    assert list(h.columns) == ["round", "split", "client", "metric", "value"]
    for name in ("history.csv", "config.json", "final_model.pt", "run_info.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "checkpoint.pt").exists()                  # replaced by the final model
    on_disk = pd.read_csv(tmp_path / "history.csv", dtype={"client": str})
    assert len(on_disk) == len(h)
    assert json.loads((tmp_path / "config.json").read_text())["num_rounds"] == 2
    assert json.loads((tmp_path / "run_info.json").read_text())["weights_source"] == "random"
    val = h[(h.split == "val") & (h.client == "global")]
    assert sorted(val["round"].unique()) == [0, 1, 2]                 # round 0 = untrained model
    assert set(val.metric) == {"loss", "mean_auroc", "mean_auprc", "selected_round"} | {
        f"{m}_{n}" for m in ("auroc", "auprc") for n in LABELS}
    chosen = val[val.metric == "selected_round"]                       # one row, at the last round
    assert len(chosen) == 1 and chosen["round"].item() == 2 and chosen["value"].item() in (1, 2)
    assert sorted(h[h.split == "test"]["round"].unique()) == [0, 1, 2]
    train = h[(h.metric == "train_loss") & (h.client != "all")]
    assert len(train) == 2 * 2 and (train.value > 0).all()
    # the round's pooled training loss is the example-weighted mean of the clients'
    r1 = h[(h["round"] == 1) & (h.split == "train")].pivot(index="client", columns="metric", values="value")
    clients = r1.drop(index="all")
    expected = (clients.train_loss * clients.num_examples).sum() / clients.num_examples.sum()
    assert r1.loc["all", "train_loss"] == pytest.approx(expected)
    sent = h[(h.metric == "bytes_sent")]["value"].iloc[0]
    assert sent == 2 * res.info["exchanged_bytes"] and sent > 2 * 52e6   # layer4+fc: 13.1M floats
    again = fedxray.build_model(weights=str(tmp_path / "final_model.pt"))   # a final model is a weights file
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_mean_auroc_is_pooled_and_matches_sklearn(tiny_splits, tmp_path):
    res = run_federated(_config(num_rounds=1), tiny_splits, tmp_path)
    run = FederatedRun(prepare(_config(num_rounds=1), tiny_splits), tmp_path / "x")
    run.model.load_state_dict(res.model.state_dict())
    probs, labels = fedxray.device.predict(run.model, run.parts.test_data, 64, torch.device("cpu"))
    from sklearn.metrics import roc_auc_score
    expected = np.nanmean([roc_auc_score(labels[:, j], probs[:, j]) if 0 < labels[:, j].sum() < len(labels)
                           else np.nan for j in range(14)])
    h = res.history
    got = h[(h.split == "test") & (h.metric == "mean_auroc") & (h["round"] == 1)]["value"].item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_interrupted_run_resumes_to_identical_result(tiny_splits, tmp_path):
    assert_resume_equals_uninterrupted(_config(num_rounds=3, fraction_fit=0.5), tiny_splits, tmp_path)


def test_resume_refuses_another_config(tiny_splits, tmp_path):
    run_federated(_config(num_rounds=1), tiny_splits, tmp_path)
    with pytest.raises(fedxray.CheckpointError, match="another configuration.*lr"):
        run_federated(_config(num_rounds=1, lr=0.5), tiny_splits, tmp_path)
    run_federated(_config(num_rounds=1, lr=0.5), tiny_splits, tmp_path, resume=False)   # explicit restart


def test_non_finite_loss_keeps_last_good_checkpoint(tiny_splits, tmp_path, monkeypatch):
    real_loss = torch.nn.BCEWithLogitsLoss.forward

    def nan_in_round_2(self, logits, y):             # as if the loss had blown up in round 2
        loss = real_loss(self, logits, y)
        return loss * float("nan") if fedxray.Client._round == 2 else loss
    real_fit = fedxray.Client.fit

    def fit(self, state, round_num, payload=None):
        fedxray.Client._round = round_num
        return real_fit(self, state, round_num, payload)
    monkeypatch.setattr(torch.nn.BCEWithLogitsLoss, "forward", nan_in_round_2)
    monkeypatch.setattr(fedxray.Client, "fit", fit)
    with pytest.raises(NonFiniteLossError, match="round 2.*checkpoint of round 1"):
        run_federated(_config(num_rounds=3), tiny_splits, tmp_path)
    ckpt = load_checkpoint(tmp_path / CHECKPOINT)
    assert ckpt["round"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["global_state"].values() if v.is_floating_point())
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["round"].max() == 1


def test_centralized_baseline_is_one_client_with_all_data(tiny_splits, tmp_path):
    res = run_centralized(_config(num_rounds=1), tiny_splits, tmp_path)
    assert res.info["client_examples"] == [len(tiny_splits["train"])]
    h = res.history
    assert h[(h.split == "test") & (h.metric == "mean_auroc")]["round"].tolist() == [0, 1]


def test_local_only_baseline_evaluates_each_client_on_the_same_test_set(tiny_splits, tmp_path):
    hist = run_local_only(_config(num_rounds=1), tiny_splits, tmp_path)
    test = hist[(hist.split == "test") & (hist.metric == "mean_auroc") & (hist["round"] == 1)]
    assert sorted(test.client) == ["0", "1"]
    assert (tmp_path / "history.csv").stat().st_size > 0
    infos = [json.loads((tmp_path / f"client_{k}" / "run_info.json").read_text()) for k in (0, 1)]
    assert infos[0]["test_examples"] == infos[1]["test_examples"] == len(tiny_splits["test"])
    assert sum(i["client_examples"][0] for i in infos) == len(tiny_splits["train"])
    # Each client's training-set size is kept: the local-only table weighs the clients by it.
    table = local_only_table(hist)
    assert table.loc[["client 0", "client 1"], "images"].tolist() == [i["client_examples"][0] for i in infos]
    test = table.loc[["client 0", "client 1"], "test mean AUROC"].to_numpy()
    weights = [i["client_examples"][0] for i in infos]
    assert table.loc["size-weighted mean", "test mean AUROC"] == pytest.approx(np.average(test, weights=weights))


def test_fedbn_evaluates_each_clients_model(tiny_splits, tmp_path):
    res = run_federated(_config(num_rounds=1, local_keys="bn"), tiny_splits, tmp_path)
    h = res.history
    r1 = h[(h.split == "val") & (h.metric == "mean_auroc") & (h["round"] == 1)]
    assert sorted(r1.client) == ["0", "1", "global"]


def test_sample_clients_is_seeded():
    a = sample_clients(10, 0.3, seed=0, round_num=1)
    assert len(a) == 3 and a == sample_clients(10, 0.3, seed=0, round_num=1)
    assert any(sample_clients(10, 0.3, seed=0, round_num=r) != a for r in range(2, 6))
    assert sample_clients(10, 0.01, 0, 1) and len(sample_clients(10, 1.0, 0, 1)) == 10


def test_cap_splits_keeps_whole_patients(tiny_splits):
    capped = cap_splits(tiny_splits, 10, seed=0)
    assert len(capped["train"]) <= 10
    full_counts = tiny_splits["train"].groupby("patient_id").size()
    for pid, n in capped["train"].groupby("patient_id").size().items():
        assert n == full_counts[pid]
    assert len(capped["test"]) < len(tiny_splits["test"])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="fraction_fit"):
        Config(fraction_fit=0)
    with pytest.raises(ValueError, match="optimizer"):
        Config(optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown field"):
        Config.from_dict({"num_clients": 2, "bogus": 1})


# ----------------------------------------------------------------------------- the setup apart from the loop

def test_centralized_with_a_column_partition_runs(tiny_splits, tmp_path):
    # The first version kept partition_column in the one-client config and partition() refused it.
    cfg = _config(num_rounds=1, partition="column", partition_column="view")
    res = run_centralized(cfg, tiny_splits, tmp_path)
    assert res.info["client_examples"] == [len(tiny_splits["train"])]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["num_clients"], saved["partition"], saved["partition_column"]) == (1, "iid", None)


def test_baselines_reuse_the_prepared_parts_and_start_from_the_initial_model(tiny_splits, tmp_path, monkeypatch):
    cfg = _config(num_rounds=1)
    parts = prepare(cfg, tiny_splits)
    initial = {k: v.clone() for k, v in parts.model.state_dict().items()}
    fed = FederatedRun(parts, tmp_path / "fed").run()
    monkeypatch.setattr(fedxray.parts, "build_model", lambda *a, **k: pytest.fail("a second model was built"))
    central = run_centralized(cfg, tiny_splits, tmp_path / "central", parts=parts)
    ckpt = load_final(tmp_path / "central" / "final_model.pt")
    assert ckpt["round"] == 1 and central.info["weights_source"] == fed.info["weights_source"]
    monkeypatch.undo()
    fresh = run_centralized(cfg, tiny_splits, tmp_path / "central_fresh")   # its own setup, from scratch
    pd.testing.assert_frame_equal(central.history, fresh.history)            # the reused parts changed nothing
    for k, v in initial.items():                                             # and round 0 saw the built model
        if not k.startswith(("layer4.", "fc.")):
            assert torch.equal(parts.model.state_dict()[k], v), k


def test_parts_refuse_a_config_of_another_setup(tiny_splits):
    parts = prepare(_config(), tiny_splits)
    with pytest.raises(ValueError, match="another setup.*image_size"):
        run_federated(_config(image_size=96), tiny_splits, "unused", parts=parts)


def test_a_fit_without_its_round_is_refused(tiny_splits):
    # The first version defaulted round_num to 1, so a caller that forgot it reused round 1's shuffle.
    run = FederatedRun(prepare(_config(), tiny_splits), "unused")
    with pytest.raises(TypeError):
        run.clients[0].fit(run.global_state)
    with pytest.raises(ValueError, match="round_num must be the round number"):
        run.clients[0].fit(run.global_state, round_num=0)


# ----------------------------------------------------------------------------- every strategy in the loop

def _strategy_config(name, **kw):
    extra = dict(optimizer="sgd", momentum=0.0, lr=1e-2) if name == "scaffold" else {}
    return _config(strategy=name, **{**extra, **kw})


@pytest.mark.parametrize("name", list(fedxray.STRATEGIES))
def test_every_strategy_resumes_to_the_uninterrupted_result(name, tiny_splits, tmp_path):
    """With client sampling, personalization (FedBN's BatchNorm and FedPer's head kept local) and the
    feature cache on: a run killed after round 2 and resumed ends bitwise where the uninterrupted run
    ends (the strategy's server state and each client's kept entries are checkpointed)."""
    cfg = _strategy_config(name, num_clients=3, fraction_fit=0.67, num_rounds=3, local_keys="bn,fc",
                           feature_cache=True, cache_dir=str(tmp_path / "cache"), preload=False)
    assert_resume_equals_uninterrupted(cfg, tiny_splits, tmp_path)
    info = json.loads((tmp_path / "full" / "run_info.json").read_text())
    assert info["strategy"] == name


def test_a_damaged_strategy_state_in_a_checkpoint_is_refused(tiny_splits, tmp_path):
    from fedxray.checkpoint import payload_digest
    cfg = _strategy_config("fedadam", num_rounds=1)
    run_unfinished(cfg, tiny_splits, tmp_path)                      # the server state is in the checkpoint
    payload = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    moment = _first_float_tensor(payload["extra"]["strategy"])      # Adam's m or v after round 1
    moment.view(-1)[0] = float("nan")
    payload["checksum"] = payload_digest({k: v for k, v in payload.items() if k != "checksum"})
    torch.save(payload, tmp_path / CHECKPOINT)                      # sealed again: only the check can catch it
    with pytest.raises(fedxray.CheckpointError, match=rf"{tmp_path / CHECKPOINT}.*fedadam server state"):
        run_federated(cfg, tiny_splits, tmp_path)


def test_scaffold_bytes_count_its_control_variates_both_ways(tiny_splits, tmp_path):
    avg = run_federated(_strategy_config("fedavg", num_rounds=1, optimizer="sgd", momentum=0.0, lr=1e-2),
                        tiny_splits, tmp_path / "avg").history
    sca = run_federated(_strategy_config("scaffold", num_rounds=1), tiny_splits, tmp_path / "sca").history
    model = fedxray.build_model(weights=None)
    params = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad)

    def comm(h, metric):
        return h[(h.split == "comm") & (h.metric == metric)]["value"].item()
    for metric in ("bytes_sent", "bytes_received"):               # 2 clients, each way
        assert comm(sca, metric) == comm(avg, metric) + 2 * params, metric


def _first_float_tensor(obj):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.numel():
        return obj
    for v in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()):
        found = _first_float_tensor(v)
        if found is not None:
            return found
    return None


def test_a_second_run_on_the_same_parts_does_not_inherit_the_server_state(tiny_splits, tmp_path):
    # Without a reset at the start, the second run began with the first run's momentum vector.
    cfg = _config(num_rounds=2, strategy="fedavgm")
    parts = prepare(cfg, tiny_splits)
    first = run_federated(cfg, tiny_splits, tmp_path / "a", parts=parts).history
    second = run_federated(cfg, tiny_splits, tmp_path / "b", parts=parts).history
    pd.testing.assert_frame_equal(first, second)


def test_baselines_run_under_balanced_label_skew(tiny_splits, tmp_path):
    # balanced_sizes is a dirichlet option: the baselines' one-client iid config must drop it
    cfg = _config(num_rounds=1, partition="dirichlet", alpha=1.0, balanced_sizes=True)
    parts = prepare(cfg, tiny_splits)
    assert run_centralized(cfg, tiny_splits, tmp_path / "c", parts=parts).history["round"].max() == 1
    assert set(run_local_only(cfg, tiny_splits, tmp_path / "l", parts=parts)["client"]) == {"0", "1"}
    with pytest.raises(ValueError, match="another setup.*min_client_patients"):
        run_federated(_config(num_rounds=1, partition="dirichlet", alpha=1.0, balanced_sizes=True,
                              min_client_patients=2), tiny_splits, "unused", parts=parts)
