"""Figures for the notebook and the report, drawn from the long-format history tables."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import pandas as pd

from .data import LABELS
from .history import ALL, GLOBAL, select
from .io import atomic_write
from .selection import reported_round


def _plt():
    import matplotlib.pyplot as plt   # lazily: `import fedxray` stays free of matplotlib
    return plt


def save_figure(fig, out_dir: str | Path, name: str, dpi: int = 150) -> list[Path]:
    """Write name.png (dpi) and name.pdf under out_dir, each atomically."""
    out = []
    for fmt in ("png", "pdf"):
        path = Path(out_dir) / f"{name}.{fmt}"
        atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))
        out.append(path)
    return out


def final_test_auroc(history: pd.DataFrame, client: str = GLOBAL) -> pd.Series:
    """Per-finding test AUROC of the reported round (see _final_test), indexed by finding name."""
    return _final_test(history, "auroc", client)


def _final_test(history: pd.DataFrame, metric: str, client: str = GLOBAL) -> pd.Series:
    """Per-finding test `metric` ("auroc" or "auprc") of the round the history reports (the one model
    selection chose, fedxray.selection.reported_round), by finding name."""
    h = select(history, "test", client=client)
    if h.empty:
        raise ValueError(f"no test rows for client {client!r} in the history")
    at = h[h["round"] == reported_round(history, client)]
    if at.empty:
        raise ValueError(f"the history reports round {reported_round(history, client)} for client {client!r}, "
                         f"but has no test rows of that round")
    per = at.set_index("metric")["value"]
    return pd.Series([per.get(f"{metric}_{n}", np.nan) for n in LABELS], index=list(LABELS), dtype=float)


def auroc_table(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Findings x methods table of final test AUROC, with a 'mean' row over scorable findings.

    A history without global rows (the local-only baseline, one model per client) gives one
    column, "<name> (mean of <k>)": per finding, the mean over its k clients."""
    return _findings_table(histories, "auroc")


def auprc_table(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """auroc_table for the final test AUPRC (average precision); NaN for a history without it."""
    return _findings_table(histories, "auprc")


def _findings_table(histories: Mapping[str, pd.DataFrame], metric: str) -> pd.DataFrame:
    cols = {}
    for name, h in histories.items():
        clients = sorted(set(h.loc[h["split"] == "test", "client"].astype(str)))
        if GLOBAL in clients:
            cols[name] = _final_test(h, metric)
        else:
            per = pd.concat({c: _final_test(h, metric, c) for c in clients}, axis=1)
            cols[f"{name} (mean of {len(clients)})"] = per.mean(axis=1)
    table = pd.DataFrame(cols)
    table.loc["mean"] = table.mean(axis=0, skipna=True)
    return table


def local_only_table(history: pd.DataFrame) -> pd.DataFrame:
    """The local-only baseline client by client (its combined history, 'client' naming each model):
    training images, the round reported, validation and test mean AUROC and test mean AUPRC; then
    the plain mean over clients, the mean weighted by training images, and the worst client (the
    lowest test mean AUROC). A small site's poor model weighs less in the weighted mean."""
    rows = {}
    for client in sorted(set(history.loc[history["split"] == "test", "client"].astype(str)), key=_client_order):
        r = reported_round(history, client)
        own = history[history["client"].astype(str) == client]
        at = own[own["round"] == r]

        def value(split: str, metric: str, frame=at) -> float:
            v = frame[(frame["split"] == split) & (frame["metric"] == metric)]["value"]
            return float(v.iloc[-1]) if len(v) else np.nan
        rows[f"client {client}"] = {"images": value("train", "num_examples", own[own["round"] == 1]), "round": r,
                                    "val mean AUROC": value("val", "mean_auroc"),
                                    "test mean AUROC": value("test", "mean_auroc"),
                                    "test mean AUPRC": value("test", "mean_auprc")}
    table = pd.DataFrame.from_dict(rows, orient="index")
    if table.empty:
        raise ValueError("no test rows of any client in the local-only history")
    scores = ["val mean AUROC", "test mean AUROC", "test mean AUPRC"]
    weights = table["images"].to_numpy(float)
    summary = {"mean": table[scores].mean(), "size-weighted mean": pd.Series(
        {c: float(np.average(table[c], weights=weights)) if np.isfinite(weights).all() and weights.sum() > 0
         and table[c].notna().all() else np.nan for c in scores})}
    worst = table["test mean AUROC"].idxmin() if table["test mean AUROC"].notna().any() else None
    out = pd.concat([table, pd.DataFrame(summary).T.assign(images=weights.sum(), round=np.nan)])
    if worst is not None:
        out.loc[f"worst ({worst})"] = table.loc[worst]
    return out


def _client_order(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def plot_prevalence(frame: pd.DataFrame, title: str = "Finding prevalence"):
    plt = _plt()
    prev = frame.loc[:, list(LABELS)].mean(axis=0).sort_values()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.barh(prev.index, 100 * prev.to_numpy(), color="tab:blue")
    ax.set_xlabel("images with the finding (%)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_partition_heatmap(table: pd.DataFrame, title: str = "Findings per client"):
    """Heatmap of a clients x findings count table (fedxray.client_finding_table)."""
    plt = _plt()
    cols = [c for c in table.columns if c in LABELS or c == "No Finding"]
    counts = table[cols].to_numpy(dtype=float)
    share = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1)   # each finding's spread
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(cols), 1.2 + 0.45 * len(table)))
    im = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right")
    ax.set_yticks(range(len(table)), [f"client {i} ({int(n)} img)" for i, n in zip(table.index, table["images"])])
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] < 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the finding's images")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _per_round_axes(fig, ax, ylabel: str, title: str):
    """The shared frame of the per-round curves: labels, title, grid, legend."""
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_curves(history: pd.DataFrame, title: str = "Loss per round"):
    """Each client's training loss (one colour each, in the legend if there are at most 10 clients),
    their example-weighted mean and the global model's validation loss per round (thick, black)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    train = history[(history["split"] == "train") & (history["metric"] == "train_loss")]
    per_client = list(train[train["client"] != ALL].groupby("client"))
    n = len(per_client)
    colors = plt.get_cmap("tab10").colors if n <= 10 else plt.get_cmap("viridis")(np.linspace(0, 0.9, n))
    for i, ((client, g), color) in enumerate(zip(per_client, colors)):
        label = f"client {client}" if n <= 10 else ("clients" if i == 0 else None)
        ax.plot(g["round"], g["value"], color=color, alpha=0.6, lw=1.2, marker=".", ms=4, label=label)
    pooled = train[train["client"] == ALL]
    ax.plot(pooled["round"], pooled["value"], color="black", lw=2.4, marker="o", zorder=3,
            label="clients' training loss, weighted mean")
    val = select(history, "val", "loss")
    ax.plot(val["round"], val["value"], "--", color="black", lw=2.4, marker="s", zorder=3,
            label="global model, validation loss")
    return _per_round_axes(fig, ax, "binary cross-entropy", title)


def _client_spread(history: pd.DataFrame, split: str, metric: str) -> pd.DataFrame:
    """Per round: mean, min and max of a metric over the clients of a history with no global
    rows (the local-only baseline), and how many clients there are."""
    rows = select(history, split, metric, client=None)
    stats = rows.groupby("round")["value"].agg(["mean", "min", "max"]).reset_index()
    return stats.assign(clients=rows["client"].nunique())


def plot_mean_auroc(histories: Mapping[str, pd.DataFrame], title: str = "Mean AUROC per round"):
    """Mean AUROC over findings per round, validation (dashed) and test (solid), one colour per run.

    A history with no global rows (the local-only baseline) is drawn as the mean over its clients,
    with a band from the lowest to the highest client; where its clients were scored at different
    rounds (test scored once, each client at its own reported round) as one point per client, since
    no round has a mean over all of them. Test scored once is a single, larger point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, (name, h) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], histories.items()):
        per_client = not (h["client"].astype(str) == GLOBAL).any()
        for split, style in (("val", "--"), ("test", "-")):
            rows = select(h, split, "mean_auroc", client=None)
            clients = rows["client"].astype(str).nunique()
            if per_client and len(rows) and (rows.groupby("round")["client"].nunique() < clients).any():
                ax.plot(rows["round"], rows["value"], linestyle="none", color=color, marker="o", ms=5,
                        label=f"{name} ({split}; each of {clients} clients at its own round)")
            elif per_client:
                g = _client_spread(h, split, "mean_auroc")
                if len(g):
                    ax.fill_between(g["round"], g["min"], g["max"], color=color, alpha=0.15, lw=0)
                    ax.plot(g["round"], g["mean"], style, color=color, marker="o", ms=3,
                            label=f"{name} ({split}; mean of {g['clients'].iat[0]}, band: min–max)")
            else:
                g = select(h, split, "mean_auroc")
                if len(g):
                    ax.plot(g["round"], g["value"], style, color=color, marker="o", ms=3 if len(g) > 1 else 6,
                            label=f"{name} ({split})")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    return _per_round_axes(fig, ax, "mean AUROC over findings", title)


def plot_auroc_bars(table: pd.DataFrame, title: str = "Test AUROC per finding",
                    intervals: Optional[Mapping[str, pd.DataFrame]] = None):
    """Grouped bars of a findings x methods table (auroc_table); the legend sits right of the axes,
    clear of the bars (save_figure keeps it: bbox_inches="tight"). intervals: method -> its
    fedxray.bootstrap_auroc table, drawn as error bars (and in the legend) where given."""
    plt = _plt()
    t = table.drop(index="mean", errors="ignore")
    intervals = dict(intervals or {})
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(t.columns), 1)
    x = np.arange(len(t))
    for i, col in enumerate(t.columns):
        mean = table.loc["mean", col] if "mean" in table.index else np.nan
        label = f"{col} (mean {mean:.3f})"
        yerr = None
        if col in intervals:
            ci = intervals[col].reindex(list(t.index) + ["mean"])
            yerr = np.vstack([(t[col] - ci["lower"].iloc[:-1]).clip(lower=0).to_numpy(),
                              (ci["upper"].iloc[:-1] - t[col]).clip(lower=0).to_numpy()])
            label = f"{col} (mean {mean:.3f}, 95% CI {ci['lower'].iloc[-1]:.3f}-{ci['upper'].iloc[-1]:.3f})"
        ax.bar(x + (i - (len(t.columns) - 1) / 2) * width, t[col], width, label=label, yerr=yerr,
               error_kw={"elinewidth": 0.8, "capsize": 1.5})
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, t.index, rotation=45, ha="right")
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("test AUROC")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_reliability(table: pd.DataFrame, title: str = "Reliability (all findings pooled)", ax=None):
    """A reliability diagram from fedxray.evaluation.reliability: mean predicted probability
    against the positive rate per bin (marker area by the bin's predictions), the diagonal of a
    calibrated model, and the expected calibration error in the legend."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(4.8, 4.5))
    used = table[table["count"] > 0]
    ece = float((used["count"] / used["count"].sum() * (used["positive_rate"] - used["mean_prob"]).abs()).sum())
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="calibrated")
    ax.plot(used["mean_prob"], used["positive_rate"], marker="o", lw=1, label=f"model (ECE {ece:.3f})")
    ax.scatter(used["mean_prob"], used["positive_rate"], s=20 + 200 * used["count"] / used["count"].max(),
               alpha=0.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_strategy_curves(histories: Mapping[str, pd.DataFrame], split: str = "val",
                         title: str = "Validation mean AUROC per round"):
    """One line per run (e.g. per strategy): the global model's mean AUROC on `split` per round."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, h in histories.items():
        g = select(h, split, "mean_auroc")
        if len(g):
            ax.plot(g["round"], g["value"], marker="o", ms=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    return _per_round_axes(fig, ax, f"{split} mean AUROC over findings", title)


def plot_final_auroc(histories: Mapping[str, pd.DataFrame], title: str = "Final test mean AUROC"):
    """One bar per run: the global model's test mean AUROC at its reported round, value printed on it."""
    plt = _plt()
    names = list(histories)
    values = [float(final_test_auroc(h).mean(skipna=True)) for h in histories.values()]
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 4.0))
    bars = ax.bar(range(len(names)), values, color="tab:blue")
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.005, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("test mean AUROC (selected round)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def privacy_table(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per run: its test mean AUROC at the reported round and its final epsilon (the
    federation's under client-level DP; the largest client's under per-patient DP-SGD, with the
    smallest beside it; NaN for a run without DP)."""
    rows = []
    for name, h in histories.items():
        eps = h[(h["split"] == "privacy") & (h["metric"] == "epsilon")]
        last = eps[eps["round"] == eps["round"].max()] if len(eps) else eps
        per_client = eps[eps["client"] != GLOBAL].groupby("client")["value"].max() if len(eps) else pd.Series(dtype=float)
        if len(last) and (last["client"] == GLOBAL).any():
            worst = best = float(last[last["client"] == GLOBAL]["value"].iloc[0])
        elif len(per_client):
            worst, best = float(per_client.max()), float(per_client.min())
        else:
            worst = best = float("nan")
        rows.append({"run": name, "test_mean_auroc": float(final_test_auroc(h).mean(skipna=True)),
                     "epsilon": worst, "epsilon_min_client": best})
    return pd.DataFrame(rows).set_index("run")


def plot_privacy_utility(table: pd.DataFrame, reference: Mapping[str, float] = {},
                         title: str = "Privacy and utility", label: str = "with DP", ax=None):
    """Test mean AUROC against epsilon (log scale) for the runs of privacy_table with a finite
    epsilon, each labelled with its name; reference: name -> AUROC drawn as horizontal lines
    (the non-private model, the run without noise). ax: draw a further series on an existing figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax)
    finite = table[np.isfinite(table["epsilon"])].sort_values("epsilon")
    ax.plot(finite["epsilon"], finite["test_mean_auroc"], marker="o", label=label)
    for name, row in finite.iterrows():
        ax.annotate(str(name), (row["epsilon"], row["test_mean_auroc"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    for (name, value), style in zip(reference.items(), ("--", "-.", ":")):
        ax.axhline(value, color="grey", ls=style, lw=1.2, label=f"{name}: {value:.3f}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    if len(finite):
        ax.set_xscale("log")
    ax.set_xlabel("epsilon (delta as in run_info.json; log scale)")
    ax.set_ylabel("test mean AUROC (selected round)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def plot_gradcam_grid(images, heatmaps, titles, boxes=None, ncols: int = 3,
                      title: str = "Where the model looks (Grad-CAM of layer4)", alpha: float = 0.45):
    """Grad-CAM heatmaps (fedxray.explain.gradcam) over their grayscale images, one panel each, ncols
    per row: a white cross where each map points (its maximum, fedxray.explain.peaks) and, where
    boxes gives some for the panel ([k, 4] x, y, w, h in the images' pixels), the boxes in green.
    images: uint8 [n, H, W]; heatmaps: [n, H, W] in [0, 1]; titles: one per panel."""
    from matplotlib.patches import Rectangle
    from .explain import peaks
    plt = _plt()
    images, heatmaps = np.asarray(images), np.asarray(heatmaps)
    n = len(images)
    if n == 0 or heatmaps.shape != images.shape or len(titles) != n or (boxes is not None and len(boxes) != n):
        raise ValueError(f"plot_gradcam_grid needs n >= 1 images [n, H, W] with heatmaps of the same shape and one "
                         f"title (and box list) each, got images {images.shape}, heatmaps {heatmaps.shape}, "
                         f"{len(titles)} titles" + ("" if boxes is None else f", {len(boxes)} box lists"))
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.8 * nrows), squeeze=False)
    where = peaks(heatmaps)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.imshow(heatmaps[i], cmap="jet", alpha=alpha, vmin=0, vmax=1)
        for x, y, w, h in (np.asarray(boxes[i], float).reshape(-1, 4) if boxes is not None else ()):
            # imshow puts pixel c's centre at c: a box edge at pixel coordinate x is drawn at x - 0.5.
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="lime", lw=1.5))
        if np.isfinite(where[i]).all():
            ax.plot(where[i][0] - 0.5, where[i][1] - 0.5, marker="+", color="white", ms=10, mew=2)
        ax.set_title(titles[i], fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_eval_matrix(matrix: pd.DataFrame, title: str = "Mean AUROC, every model on every site's test"):
    """The cross-site matrix (fedxray.crosssite.eval_matrix: models x site tests + pooled) as an
    annotated heatmap; an empty cell (no model to score there) is drawn blank and marked "-"."""
    plt = _plt()
    if matrix.empty:
        raise ValueError("plot_eval_matrix: the matrix is empty")
    values = matrix.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * matrix.shape[1] + 3.2, 0.45 * matrix.shape[0] + 1.6))
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if len(finite) else (0.5, 1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-3), aspect="auto")
    middle = (lo + hi) / 2
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "-" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                color="black" if np.isfinite(v) and v > middle else "white" if np.isfinite(v) else "grey")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns)
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    ax.set_xlabel("test set")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="mean AUROC", shrink=0.8)
    fig.tight_layout()
    return fig
