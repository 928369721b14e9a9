"""Figures and the results table, from hand-made history tables."""
import numpy as np
import pandas as pd
import pytest

from fedxray import LABELS
from fedxray import plots


def _history(rounds=2, clients=("0", "1"), eval_client="global", auc=0.7):
    rows = []
    for r in range(rounds + 1):
        for split in ("val", "test"):
            rows.append((r, split, eval_client, "loss", 0.7 - 0.1 * r))
            rows.append((r, split, eval_client, "mean_auroc", auc))
            rows += [(r, split, eval_client, f"auroc_{n}", auc + 0.01 * j) for j, n in enumerate(LABELS)]
        if r:
            rows += [(r, "train", c, "train_loss", 0.6 - 0.1 * r) for c in clients]
            rows.append((r, "train", "all", "train_loss", 0.6 - 0.1 * r))
    return pd.DataFrame(rows, columns=["round", "split", "client", "metric", "value"])


def test_final_test_auroc_takes_the_last_round():
    h = _history()
    h.loc[(h["round"] < 2) & (h.metric == "auroc_Hernia"), "value"] = 0.1
    s = plots.final_test_auroc(h)
    assert list(s.index) == list(LABELS)
    assert s["Hernia"] == pytest.approx(0.7 + 0.13)
    with pytest.raises(ValueError, match="no test rows"):
        plots.final_test_auroc(h[h.split != "test"])


def test_auroc_table_with_local_only_clients():
    local = pd.concat([_history(eval_client="0", auc=0.6), _history(eval_client="1", auc=0.8)])
    t = plots.auroc_table({"FedAvg": _history(auc=0.75), "local-only": local})
    assert list(t.columns) == ["FedAvg", "local-only (mean of 2)"]
    assert t.loc["Atelectasis", "local-only (mean of 2)"] == pytest.approx(0.7)
    assert t.loc["mean", "FedAvg"] == pytest.approx(np.mean([0.75 + 0.01 * j for j in range(14)]))


def test_figures_are_written_as_png_and_pdf(tmp_path):
    h = _history()
    meta = pd.DataFrame(np.eye(14, dtype=np.uint8), columns=list(LABELS))
    table = pd.DataFrame({"images": [10, 4], "patients": [3, 2], **{n: [1, 0] for n in LABELS},
                          "No Finding": [2, 4]})
    figs = {
        "loss": plots.plot_loss_curves(h),
        "auroc": plots.plot_mean_auroc({"FedAvg": h}),
        "bars": plots.plot_auroc_bars(plots.auroc_table({"FedAvg": h})),
        "prev": plots.plot_prevalence(meta),
        "heat": plots.plot_partition_heatmap(table),
    }
    for name, fig in figs.items():
        paths = plots.save_figure(fig, tmp_path, name)
        assert [p.suffix for p in paths] == [".png", ".pdf"]
        assert all(p.stat().st_size > 1000 for p in paths)
        assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.{e}" for n in figs for e in ("png", "pdf"))


def test_strategy_figures_draw_one_series_per_run_with_the_final_values():
    runs = {"fedavg": _history(auc=0.7), "fedprox": _history(auc=0.8), "fedadam": _history(auc=0.6)}
    fig = plots.plot_strategy_curves(runs)
    lines = [l for l in fig.axes[0].get_lines() if l.get_label() in runs]
    assert [l.get_label() for l in lines] == list(runs)
    assert list(lines[1].get_ydata()) == [0.8, 0.8, 0.8]                 # the val series of fedprox
    bars = plots.plot_final_auroc(runs).axes[0].patches
    expected = [plots.final_test_auroc(h).mean() for h in runs.values()]
    assert [b.get_height() for b in bars] == pytest.approx(expected)
