"""Runs under one output root: one folder per configuration, found again by the same one, and
the runs table."""
import json

import numpy as np
import pandas as pd
import pytest

from fedxray import Config, run_federated
from fedxray import history as hist
from fedxray.runs import MANIFEST, RUNS_TABLE, add_times, run_folder, runs_table

DATA = {"inputs": {"trunk": "ab" * 32, "val": "cd" * 32}, "weights": "random"}


def test_each_configuration_has_its_own_folder_found_again(tmp_path):
    demo = Config.for_dataset("demo")
    a = run_folder(tmp_path, demo, "demo", DATA)
    assert a.new and a.path.name.startswith("defaults-") and a.changed == {}
    assert run_folder(tmp_path, demo, "demo", DATA).path == a.path                     # the same: found again
    assert not run_folder(tmp_path, Config.for_dataset("demo", progress=False), "demo", DATA).new  # runtime only
    b = run_folder(tmp_path, Config.for_dataset("demo", lr=0.01), "demo", DATA)
    assert b.path != a.path and b.path.name.startswith("lr=0.01-") and b.changed == {"lr": 0.01}
    c = run_folder(tmp_path, demo, "demo", {**DATA, "weights": "imagenet"})            # other weights resolved
    assert c.path not in (a.path, b.path)
    d = run_folder(tmp_path, demo, "demo", DATA, hyperparameters={"proximal_mu": 0.1})  # used by compare runs
    assert d.path not in (a.path, b.path, c.path) and d.changed == {"proximal_mu": 0.1}


def test_an_edited_manifest_is_refused(tmp_path):
    a = run_folder(tmp_path, Config.for_dataset("demo"), "demo", DATA)
    m = json.loads((a.path / MANIFEST).read_text())
    m["identity"]["parameters"]["lr"] = 0.5
    (a.path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"{a.path / MANIFEST}.*delete"):
        run_folder(tmp_path, Config.for_dataset("demo"), "demo", DATA)


def test_runs_table_has_a_row_per_run(tiny_splits, tmp_path):
    rows = {}
    for lr in (1e-3, 1e-2):
        cfg = Config(num_clients=2, num_rounds=1, batch_size=8, image_size=64, weights=None, progress=False,
                     lr=lr, eval_batch_size=16)
        folder = run_folder(tmp_path, cfg, "demo", DATA)
        res = run_federated(cfg, tiny_splits, folder.path / "fedavg")
        add_times(folder.path, {"federated": 2.0})
        add_times(folder.path, {"federated": 1.5, "baselines": 1.0})
        rows[lr] = res.history
    (tmp_path / "not-a-run").mkdir()
    table = runs_table(tmp_path)
    assert pd.read_csv(tmp_path / RUNS_TABLE).shape == table.shape
    assert len(table) == 2 and table["param lr"].tolist() == [0.001, 0.01]
    assert table["complete"].all() and table["round"].tolist() == [1, 1]
    for lr, h in rows.items():
        row = table[table["param lr"] == lr].iloc[0]
        assert row["fedavg test"] == hist.last_value(h, "test", "mean_auroc")
        assert row["fedavg val"] == hist.last_value(h, "val", "mean_auroc")
        assert row["fedavg test AUPRC"] == hist.last_value(h, "test", "mean_auprc")
        assert row["wall_s"] == 4.5 and row["weights"] == "random" and row["problem"] == ""


def test_runs_table_test_auprc_of_local_only_is_the_clients_mean_and_nan_for_old_histories(tmp_path):
    rng = np.random.default_rng(0)
    folder = run_folder(tmp_path, Config.for_dataset("demo"), "demo", DATA).path
    histories = {"local_only": ("0", "1"), "centralized": (hist.GLOBAL,)}
    for method, clients in histories.items():
        rows = []
        for r in (0, 1):
            for split in ("val", "test"):
                for c in clients:
                    labels = (rng.random((30, 14)) < 0.3).astype(float)
                    rows += hist.metric_rows(r, split, c, rng.random(labels.shape), labels)
        histories[method] = hist.frame(rows)
        (folder / method).mkdir()
        histories[method].to_csv(folder / method / "history.csv", index=False)
    old = histories["centralized"]
    old[~old.metric.str.contains("auprc")].to_csv(folder / "centralized" / "history.csv", index=False)
    row = runs_table(tmp_path, write=False).iloc[0]
    local = histories["local_only"]
    expected = local[(local.split == "test") & (local.metric == "mean_auprc") & (local["round"] == 1)]["value"]
    assert len(expected) == 2 and row["local-only test AUPRC"] == pytest.approx(expected.mean())
    assert row["centralized test"] == pytest.approx(hist.last_value(old, "test", "mean_auroc"))
    assert np.isnan(row["centralized test AUPRC"]) and row["problem"] == ""
    assert [c for c in row.index if c.startswith("local-only")] == ["local-only val", "local-only test",
                                                                   "local-only test AUPRC"]


def test_a_broken_history_is_named_in_the_table(tmp_path):
    folder = run_folder(tmp_path, Config.for_dataset("demo"), "demo", DATA).path
    (folder / "fedavg").mkdir()
    (folder / "fedavg" / "history.csv").write_text("round,split\n1,val\n")
    table = runs_table(tmp_path, write=False)
    assert "history.csv: columns ['round', 'split']" in table["problem"].iloc[0]


def test_history_read_checks_what_it_reads(tmp_path):
    good = hist.frame([hist.row(0, "val", hist.GLOBAL, "loss", 0.5)])
    good.to_csv(tmp_path / "h.csv", index=False)
    assert hist.read(tmp_path / "h.csv").equals(good)
    (tmp_path / "bad.csv").write_text("round,split,client,metric,value\n0,nonsense,global,loss,0.5\n")
    with pytest.raises(ValueError, match=r"bad.csv: unknown split"):
        hist.read(tmp_path / "bad.csv")
    (tmp_path / "text.csv").write_text("round,split,client,metric,value\n0,val,global,loss,high\n")
    with pytest.raises(ValueError, match=r"text.csv: column 'value' must be numeric"):
        hist.read(tmp_path / "text.csv")


def test_a_damaged_times_file_is_named_not_summed_silently(tmp_path, caplog):
    folder = run_folder(tmp_path, Config.for_dataset("demo"), "demo", DATA).path
    (folder / "times.json").write_text('{"federated": "a lot"}')
    assert "times.json: not a mapping of section names to seconds" in runs_table(tmp_path, write=False)["problem"].iloc[0]
    with caplog.at_level("WARNING", logger="fedxray.runs"):
        assert add_times(folder, {"federated": 2.0}) == {"federated": 2.0}
    assert "times.json: not a mapping" in caplog.text
    assert runs_table(tmp_path, write=False)["wall_s"].iloc[0] == 2.0
