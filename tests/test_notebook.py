"""The notebook, executed top to bottom by papermill on the demo data with small parameters."""
import json
import logging
import re

import pandas as pd
import pytest

from conftest import ROOT
from fedxray import config as fedxray_config

NOTEBOOK = ROOT / "notebooks" / "federated_chestxray.ipynb"
# The demo's FedAvg with the notebook's defaults measured 0.784 (bootstrap 0.768 to 0.800), short of
# the 0.80 the issue asked for (README, "The demo targets, measured"); this floor catches a demo or
# recipe that gets worse.
FEDAVG_FLOOR = 0.77
FIGURES = ("prevalence", "partition_heatmap", "loss_curves", "mean_auroc", "auroc_per_finding", "reliability",
           "strategies_val_auroc", "strategies_test_auroc", "eval_matrix", "gradcam")


def _parameters_cell() -> str:
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    return "".join(code[0]["source"])


def test_committed_notebook_has_a_parameters_cell_and_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    for c in nb["cells"]:
        assert not c.get("outputs") and c.get("execution_count") is None
    names = _defined(_parameters_cell())
    for name in ("data_dir", "output_dir", "resume", "progress", "num_clients", "num_rounds", "local_epochs",
                 "fraction_fit", "batch_size", "lr", "image_size", "partition", "alpha", "seed", "weights",
                 "max_images", "strategy", "compare", *fedxray_config.STRATEGY_FIELDS):
        assert name in names, name


def _defined(source: str) -> dict:
    scope: dict = {}
    exec(compile(source, "parameters", "exec"), scope)
    return {k: v for k, v in scope.items() if not k.startswith("__") and k != "Optional"}


def test_papermill_reads_every_parameter_with_its_type_and_comment(caplog):
    """papermill --help-notebook lists each parameter with its type and help, and parses the cell
    without "Unable to parse line" (a comment holding '=' once broke two parameters)."""
    pm = pytest.importorskip("papermill")
    with caplog.at_level(logging.WARNING, logger="papermill"):
        inferred = pm.inspect_notebook(str(NOTEBOOK))
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()]
    values = _defined(_parameters_cell())
    assert set(inferred) == set(values)
    for name, p in inferred.items():
        assert p["inferred_type_name"] not in ("None", ""), name
        assert len(p["help"]) > 5, name
        assert eval(p["default"], {}) == values[name], name


def _execute(tmp_path, name: str, **parameters):
    pm = pytest.importorskip("papermill")
    small = dict(data_dir="demo", num_clients=2, num_rounds=1, max_images=40, image_size=64, batch_size=16,
                 progress=False)
    out = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), kernel_name="python3", cwd=str(ROOT), progress_bar=False,
                        parameters={**small, **parameters})
    return out.read_text()


def _as_displayed(notebook_text: str) -> list[str]:
    """The text lines of every output as a notebook viewer shows them: consecutive outputs of one
    stream joined, each line only what follows its last carriage return; and the plain text of
    displayed objects (where a progress widget leaves its "0%" placeholder)."""
    lines = []
    for cell in json.loads(notebook_text)["cells"]:
        text, name = "", None
        for out in cell.get("outputs", []) + [{"output_type": "end"}]:
            if out["output_type"] == "stream" and out["name"] == name:
                text += "".join(out["text"])
                continue
            lines += [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
            text, name = ("".join(out["text"]), out["name"]) if out["output_type"] == "stream" else ("", None)
            if out["output_type"] == "display_data":
                lines += "".join(out["data"].get("text/plain", "")).split("\n")
    return [line for line in lines if line.strip()]


@pytest.mark.slow
def test_notebook_runs_tweaked_and_again_on_demo_data(tmp_path):
    """Run All, then Run All with another lr in the same output root (a new run in its own
    folder), then the first configuration again (found and read back: nothing retrained)."""
    root = tmp_path / "runs"
    first = _execute(tmp_path, "first", output_dir=str(root), copy_figures_to=str(tmp_path / "copies"),
                     compare=["fedavg", "fedprox"], proximal_mu=0.1, eta=0.05,   # eta: fedprox must ignore it
                     progress=True)
    (run,) = [m.parent for m in root.glob("*/run.json")]
    for method in ("fedavg", "centralized", "compare/fedprox"):
        for name in ("history.csv", "config.json", "final_model.pt"):
            assert (run / method / name).stat().st_size > 0, f"{method}/{name}"
        assert not (run / method / "checkpoint.pt").exists()
    for k in (0, 1):                                              # local-only: histories, no models
        assert (run / "local_only" / f"client_{k}" / "final_result.pt").exists()
        assert not (run / "local_only" / f"client_{k}" / "final_model.pt").exists()
    assert len(list((root / "trunks").glob("trunk-*.pt"))) == 1    # random weights: one trunk for all
    assert (run / "test_auroc.csv").stat().st_size > 0
    # How sure are we: the bootstrap's estimates are the history's test AUROCs, on the same model and patients.
    ci = pd.read_csv(run / "test_auroc_intervals.csv", header=[0, 1], index_col=0)
    auroc = pd.read_csv(run / "test_auroc.csv", index_col=0)
    for method in ("fedavg", "centralized"):
        assert ci[(method, "estimate")]["mean"] == pytest.approx(auroc.loc["mean", method], abs=1e-6)
        scored = ci[(method, "estimate")].notna()                       # (a tiny test set lacks some findings)
        assert scored["mean"] and (ci[(method, "lower")][scored] <= ci[(method, "estimate")][scored] + 1e-12).all()
    assert (run / "paired_difference.csv").stat().st_size > 0 and "fedavg minus centralized" in first
    # Per hospital: every model of the run on every site's own test and the pooled one.
    matrix = pd.read_csv(run / "eval_matrix.csv", index_col=0)
    assert list(matrix.columns) == ["site 0", "site 1", "pooled"]
    assert list(matrix.index) == ["fedavg", "centralized", "fedprox", "fedavg + fine-tuning", "fedper", "fedbn",
                                  "local-only 0", "local-only 1"]
    assert matrix.loc["fedavg", "pooled"] == pytest.approx(auroc.loc["mean", "fedavg"], abs=1e-9)
    assert "Skipped: on the synthetic demo" in first                   # no published NIH numbers beside demo scores
    # Where the model looks: the demo's own boxes scored (pointing game and IoU, each beside the centre's).
    where = pd.read_csv(run / "localisation.csv", index_col=0)
    assert where.loc["all", "images"] >= 1 and "all" == where.index[-1]
    assert where[["pointing", "pointing (centre)", "IoU", "IoU (centre)"]].apply(lambda c: c.between(0, 1)).all().all()
    for fig in FIGURES:
        for ext in ("png", "pdf"):
            assert (run / "figures" / f"{fig}.{ext}").stat().st_size > 1000, f"{fig}.{ext}"
        assert (tmp_path / "copies" / f"{fig}.png").stat().st_size > 1000
    assert "synthetic demo data" in first
    shown = _as_displayed(first)        # what Jupyter or nbconvert shows of the exported notebook
    bars = [line for line in shown if re.search(r"\| \d+/\d+ \[", line)]   # tqdm's "| n/total [time"
    assert len(bars) == 1 + 1 + 2 + 1 + 2 + 1 + 1 and all("100%|" in b and "val AUROC" in b for b in bars), bars
    assert not [line for line in shown if "0%|" in line and "100%|" not in line]
    saved = json.loads((run / "compare" / "fedprox" / "config.json").read_text())
    assert (saved["strategy"], saved["proximal_mu"], saved["eta"]) == ("fedprox", 0.1, None)
    assert not (run / "compare" / "fedavg").exists()              # the main run is fedavg: not trained twice

    # The privacy section: off above, on here (client-level DP; a DP run prints its epsilon).
    text = _execute(tmp_path, "second", output_dir=str(root), lr=0.01, run_baselines=False, compare=[],
                    privacy_sweep=[0.01], personalize=[], seeds=[0, 1])
    second = [m.parent for m in root.glob("*/run.json") if m.parent != run]
    assert len(second) == 1 and "_lr=0.01_" in second[0].name
    assert (second[0] / "fedavg" / "final_model.pt").exists()
    assert not (run / "privacy").exists()                         # the sweep is off by default
    sweep = pd.read_csv(second[0] / "privacy.csv", index_col="run")
    assert list(sweep.index) == ["no noise", "z=0.01"]
    assert sweep.loc["no noise", "epsilon"] == float("inf") and 1e3 < sweep.loc["z=0.01", "epsilon"] < float("inf")
    assert (second[0] / "figures" / "privacy_utility.png").stat().st_size > 1000
    assert "epsilon" in text
    spread = pd.read_csv(second[0] / "seeds_summary.csv", index_col=0)   # seed 0 read back, seed 1 trained
    assert spread.loc["fedavg", "seeds"] == 2 and (second[0] / "seeds" / "seed_1" / "fedavg" / "final_model.pt").exists()
    assert not (second[0] / "seeds" / "seed_0").exists()
    table = pd.read_csv(root / "runs.csv")
    assert len(table) == 2 and sorted(table["param lr"]) == [0.001, 0.01]
    assert table["complete"].all() and table["fedavg test"].notna().all()

    stamp = {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")}
    again = _execute(tmp_path, "again", output_dir=str(root), compare=["fedavg", "fedprox"], proximal_mu=0.1,
                     eta=0.05)
    assert "found again" in again and "finished earlier" in again
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")} == stamp   # nothing trained or rewritten
    assert len(pd.read_csv(root / "runs.csv")) == 2


@pytest.mark.slow
def test_the_demo_tells_methods_apart(tmp_path):
    """The README's demo targets, with the notebook's defaults from random weights (no internet, no
    ImageNet weights; each site's own test patients held out, site_test_fraction 0.2), every method
    at its best-validation round, synthetic data: a linear model on
    raw pixels stays at 0.70 or below; FedAvg reaches FEDAVG_FLOOR and 0.10 above the probe;
    centralized is at least as good; under dirichlet alpha 0.1 the local-only mean over the 5
    clients is at least 0.05 below that partition's FedAvg."""
    import fedxray
    from fedxray import Config
    from fedxray.parts import prepare
    from fedxray.plots import local_only_table
    from fedxray.selection import reported_round

    def score(history) -> float:
        test = history[(history.split == "test") & (history.metric == "mean_auroc") & (history.client == "global")]
        return test[test["round"] == reported_round(history)]["value"].item()

    data = fedxray.make_demo_dataset(ROOT / "data" / "demo", seed=0, progress=False)
    splits = fedxray.split_by_patient(fedxray.load_nih(data), val_fraction=0.1, seed=0)
    probe = fedxray.demo.linear_probe(data).loc["mean", "auroc"]
    scores = {}
    for partition, alpha in (("iid", 0.5), ("dirichlet", 0.1)):
        config = Config.for_dataset("demo", weights=None, progress=False, cache_dir=str(tmp_path / "cache"),
                                    partition=partition, alpha=alpha)
        assert config.num_rounds == 10 and config.image_size == 64 and config.feature_cache
        assert config.site_test_fraction == 0.2
        parts = prepare(config, splits)
        out = tmp_path / partition
        scores[partition, "fedavg"] = score(fedxray.run_federated(config, splits, out / "fedavg", parts=parts).history)
        if partition == "iid":
            scores[partition, "centralized"] = score(
                fedxray.run_centralized(config, splits, out / "centralized", parts=parts).history)
        else:
            local = local_only_table(fedxray.run_local_only(config, splits, out / "local", parts=parts))
            scores[partition, "local-only"] = local.loc["mean", "test mean AUROC"]
    report = {"probe": probe, **{f"{p} {m}": v for (p, m), v in scores.items()}}
    assert probe <= 0.70, report
    assert scores["iid", "fedavg"] >= max(FEDAVG_FLOOR, probe + 0.10), report
    assert scores["iid", "centralized"] >= scores["iid", "fedavg"], report
    assert scores["dirichlet", "local-only"] <= scores["dirichlet", "fedavg"] - 0.05, report


def test_for_dataset_fills_only_none_defaults():
    from fedxray import Config
    c = Config.for_dataset("nih", image_size=None, num_rounds=3, weights=None, max_images=None)
    assert (c.image_size, c.num_rounds, c.weights, c.max_images) == (224, 3, None, None)
    with pytest.raises(ValueError, match="dataset must be one of"):
        Config.for_dataset("chexpert")
