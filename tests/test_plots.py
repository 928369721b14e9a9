"""Figures and the results table, from hand-made history tables."""
import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from fedxray import LABELS
from fedxray import history as hist
from fedxray import plots

matplotlib.use("Agg")


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


def _scored_history(clients=("global",), rounds=2, seed=0):
    """Val and test rows as the drivers write them (history.metric_rows), new predictions each round."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(rounds + 1):
        for split in ("val", "test"):
            for c in clients:
                labels = (rng.random((40, len(LABELS))) < 0.3).astype(float)
                rows += hist.metric_rows(r, split, c, rng.random(labels.shape), labels)
    return hist.frame(rows)


def test_auprc_table_takes_the_last_round_values_as_auroc_table_does():
    fed, local = _scored_history(), _scored_history(clients=("0", "1"), seed=1)
    a = plots.auprc_table({"FedAvg": fed, "local-only": local})
    assert list(a.columns) == ["FedAvg", "local-only (mean of 2)"] and list(a.index) == [*LABELS, "mean"]
    last = fed[(fed.split == "test") & (fed["round"] == 2)].set_index("metric")["value"]
    assert a["FedAvg"].drop("mean").tolist() == pytest.approx([last[f"auprc_{n}"] for n in LABELS])
    assert a.loc["mean", "FedAvg"] == pytest.approx(last["mean_auprc"])      # no finding is NaN here
    per_client = local[(local.split == "test") & (local["round"] == 2)].pivot(index="metric", columns="client", values="value")
    assert a.loc["Hernia", "local-only (mean of 2)"] == pytest.approx(per_client.loc["auprc_Hernia"].mean())
    auc = plots.auroc_table({"FedAvg": fed})
    assert auc["FedAvg"].drop("mean").tolist() == pytest.approx([last[f"auroc_{n}"] for n in LABELS])
    assert plots.auprc_table({"old": _history()})["old"].isna().all()        # written before AUPRC


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


def test_auroc_bars_legend_lies_outside_the_axes():
    runs = {"fedavg": _history(auc=0.9), "fedprox": _history(auc=0.85), "local-only": _history(auc=0.8)}
    fig = plots.plot_auroc_bars(plots.auroc_table(runs))
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    assert not legend.overlaps(ax.get_window_extent())                   # so it covers no bar
    assert all(not legend.overlaps(b.get_window_extent()) for b in ax.patches)
    assert fig.get_tightbbox().contains(legend.x1 / fig.dpi - 1e-3, legend.y1 / fig.dpi - 1e-3)  # kept when saved


def test_auroc_bars_draw_the_bootstrap_intervals_as_error_bars():
    runs = {"fedavg": _history(auc=0.9), "centralized": _history(auc=0.85)}
    table = plots.auroc_table(runs)
    ci = pd.DataFrame({"estimate": table["fedavg"], "lower": table["fedavg"] - 0.05,
                       "upper": table["fedavg"] + 0.02})
    fig = plots.plot_auroc_bars(table, intervals={"fedavg": ci})
    ax = fig.axes[0]
    bars = [c for c in ax.containers if c.get_label().startswith("fedavg")][0]
    assert bars.errorbar is not None
    segments = bars.errorbar.lines[2][0].get_segments()                   # one vertical line per finding
    assert len(segments) == len(table) - 1
    spans = sorted({round(float(s[1][1] - s[0][1]), 9) for s in segments if np.isfinite(s).all()})
    assert spans == [0.07]                                                # 0.05 below + 0.02 above each bar
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("95% CI" in t for t in labels if t.startswith("fedavg"))
    assert not any("95% CI" in t for t in labels if t.startswith("centralized"))


def _local_only(num_clients=4, rounds=3, seed=0):
    """A local-only history as run_local_only returns it: each client's own val/test rows, no global."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(num_clients):
        h = _history(rounds=rounds, eval_client=str(k))
        h = h[h.split != "train"].copy()
        auroc = h.metric == "mean_auroc"
        h.loc[auroc, "value"] = rng.uniform(0.5, 0.9, auroc.sum())
        frames.append(h)
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("client_dtype", [str, int])                   # int: as read back from CSV
def test_mean_auroc_draws_the_local_only_mean_and_min_max_band(client_dtype):
    local = _local_only()
    local["client"] = local["client"].astype(client_dtype)
    fig = plots.plot_mean_auroc({"FedAvg": _history(), "local-only": local})
    ax = fig.axes[0]
    labels = [l.get_label() for l in ax.get_lines()]
    assert "FedAvg (val)" in labels and "FedAvg (test)" in labels
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2                                               # val and test, local-only only
    for split, band in zip(("val", "test"), bands):
        oracle = local[(local.split == split) & (local.metric == "mean_auroc")].groupby("round")["value"]
        line = ax.get_lines()[labels.index(f"local-only ({split}; mean of 4, band: min–max)")]
        assert list(line.get_xdata()) == list(oracle.mean().index)
        assert line.get_ydata() == pytest.approx(oracle.mean().to_numpy())
        xy = band.get_paths()[0].vertices
        for r in oracle.mean().index:
            ys = xy[np.isclose(xy[:, 0], r), 1]
            assert ys.min() == pytest.approx(oracle.min()[r]) and ys.max() == pytest.approx(oracle.max()[r])


def test_local_only_test_scored_once_per_client_is_drawn_as_points_not_a_mean():
    # Test scored once, each client at its own reported round: no round holds all clients, so a
    # "mean of 4" line would join single clients' scores (it did); each client is a point instead.
    local = _local_only(rounds=3)
    test = (local.split == "test") & (local.metric == "mean_auroc")
    own_round = {"0": 1, "1": 3, "2": 2, "3": 3}
    local = local[~test | (local["round"] == local["client"].map(own_round))]
    fig = plots.plot_mean_auroc({"local-only": local})
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    assert "local-only (test; mean of 4, band: min–max)" not in lines
    points = lines["local-only (test; each of 4 clients at its own round)"]
    assert points.get_linestyle() == "None"
    kept = local[(local.split == "test") & (local.metric == "mean_auroc")]
    assert sorted(zip(points.get_xdata(), points.get_ydata())) == sorted(zip(kept["round"], kept["value"]))
    assert "local-only (val; mean of 4, band: min–max)" in lines              # every round: still a mean


def test_loss_curves_show_each_client_clearly_and_legend_them():
    fig = plots.plot_loss_curves(_history(rounds=3, clients=("0", "1", "2")))
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    clients = [lines[f"client {k}"] for k in range(3)]
    assert all(l.get_alpha() >= 0.5 and l.get_linewidth() >= 1.0 for l in clients)
    assert len({l.get_color() for l in clients}) == 3
    assert all(l.get_linewidth() >= 2 * clients[0].get_linewidth() for l in lines.values() if l not in clients)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[:3] == ["client 0", "client 1", "client 2"]
    many = plots.plot_loss_curves(_history(clients=[str(k) for k in range(12)]))
    legend = [t.get_text() for t in many.axes[0].get_legend().get_texts()]
    assert legend.count("clients") == 1 and not any(t.startswith("client ") for t in legend)


def test_local_only_table_reports_each_client_the_worst_and_a_size_weighted_mean():
    from fedxray import history as hist
    from fedxray.plots import local_only_table
    rows = []
    for client, (n, chosen, scores) in {"0": (10, 1, (0.6, 0.55)), "1": (30, 2, (0.5, 0.7)),
                                        "2": (60, 1, (0.9, 0.8))}.items():
        rows.append(hist.row(1, "train", client, "num_examples", n))
        for r, s in zip((1, 2), scores):
            rows += [hist.row(r, "val", client, "mean_auroc", s), hist.row(r, "test", client, "mean_auroc", s - 0.05),
                     hist.row(r, "test", client, "mean_auprc", s / 2)]
        rows.append(hist.row(2, "val", client, "selected_round", chosen))
    table = local_only_table(hist.frame(rows))
    # Each client at its own selected round: 0 -> round 1 (0.55), 1 -> round 2 (0.65), 2 -> round 1 (0.85).
    assert table.loc[["client 0", "client 1", "client 2"], "round"].tolist() == [1, 2, 1]
    np.testing.assert_allclose(table.loc[["client 0", "client 1", "client 2"], "test mean AUROC"], [0.55, 0.65, 0.85])
    assert table.loc["mean", "test mean AUROC"] == pytest.approx((0.55 + 0.65 + 0.85) / 3)
    assert table.loc["size-weighted mean", "test mean AUROC"] == pytest.approx((10 * .55 + 30 * .65 + 60 * .85) / 100)
    assert table.loc["worst (client 0)", "test mean AUROC"] == pytest.approx(0.55)
    assert table.loc["size-weighted mean", "images"] == 100


def test_eval_matrix_heatmap_writes_every_cell_and_marks_the_empty_one(tmp_path):
    from fedxray.plots import plot_eval_matrix
    matrix = pd.DataFrame({"site 0": [0.71, 0.66], "site 1": [0.74, 0.69], "pooled": [0.72, np.nan]},
                          index=["fedavg", "fedavg + fine-tuning"])
    fig = plot_eval_matrix(matrix)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["0.710", "0.740", "0.720", "0.660", "0.690", "-"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["fedavg", "fedavg + fine-tuning"]
    assert all(p.stat().st_size > 1000 for p in plots.save_figure(fig, tmp_path, "m"))
    with pytest.raises(ValueError, match="empty"):
        plot_eval_matrix(pd.DataFrame())
