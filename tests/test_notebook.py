"""The notebook, executed top to bottom by papermill on the demo data with small parameters."""
import json

import pytest

from conftest import ROOT
from fedxray import config as fedxray_config

NOTEBOOK = ROOT / "notebooks" / "federated_chestxray.ipynb"
FIGURES = ("prevalence", "partition_heatmap", "loss_curves", "mean_auroc", "auroc_per_finding",
           "strategies_val_auroc", "strategies_test_auroc")


def test_committed_notebook_has_a_parameters_cell_and_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    for c in code:
        assert not c.get("outputs") and c.get("execution_count") is None
    params = "".join(code[0]["source"])
    for name in ("data_dir", "output_dir", "num_clients", "num_rounds", "local_epochs", "fraction_fit",
                 "batch_size", "lr", "image_size", "partition", "alpha", "seed", "weights", "max_images",
                 "strategy", "compare", *fedxray_config.STRATEGY_FIELDS):
        assert f"\n{name} = " in "\n" + params, name


@pytest.mark.slow
def test_notebook_runs_on_demo_data(tmp_path):
    pm = pytest.importorskip("papermill")
    out = tmp_path / "run"
    pm.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), kernel_name="python3", cwd=str(ROOT),
        progress_bar=False,
        parameters=dict(data_dir="demo", output_dir=str(out), num_clients=2, num_rounds=1,
                        max_images=40, image_size=64, batch_size=16, copy_figures_to=str(tmp_path / "copies"),
                        compare=["fedavg", "fedprox"], proximal_mu=0.1, eta=0.05))   # eta: fedprox must ignore it
    for run in ("fedavg", "centralized", "local_only/client_0", "local_only/client_1", "compare/fedprox"):
        for name in ("history.csv", "config.json", "final_model.pt"):
            assert (out / run / name).stat().st_size > 0, f"{run}/{name}"
    assert (out / "test_auroc.csv").stat().st_size > 0
    for fig in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 1000, f"{fig}.{ext}"
        assert (tmp_path / "copies" / f"{fig}.png").stat().st_size > 1000
    text = (tmp_path / "executed.ipynb").read_text()
    assert "synthetic demo data" in text
    saved = json.loads((out / "compare" / "fedprox" / "config.json").read_text())
    assert (saved["strategy"], saved["proximal_mu"], saved["eta"]) == ("fedprox", 0.1, None)
    assert not (out / "compare" / "fedavg").exists()              # the main run is fedavg: not trained twice


@pytest.mark.slow
def test_demo_defaults_reach_the_promised_auroc(tmp_path):
    """The README's promise: the notebook's defaults on the demo data, from random weights (no
    internet, no ImageNet weights), reach a test mean AUROC of at least 0.75."""
    import fedxray
    from fedxray import Config

    data = fedxray.make_demo_dataset(ROOT / "data" / "demo", seed=0, progress=False)
    splits = fedxray.split_by_patient(fedxray.load_nih(data), val_fraction=0.1, seed=0)
    config = Config.for_dataset("demo", weights=None, progress=False, cache_dir=str(tmp_path / "cache"))
    assert config.num_rounds == 5 and config.image_size == 64 and config.feature_cache
    history = fedxray.run_federated(config, splits, tmp_path / "run").history
    final = history[(history.split == "test") & (history.metric == "mean_auroc") & (history["round"] == 5)]
    assert final["value"].item() >= 0.75


def test_for_dataset_fills_only_none_defaults():
    from fedxray import Config
    c = Config.for_dataset("nih", image_size=None, num_rounds=3, weights=None, max_images=None)
    assert (c.image_size, c.num_rounds, c.weights, c.max_images) == (224, 3, None, None)
    with pytest.raises(ValueError, match="dataset must be one of"):
        Config.for_dataset("chexpert")
