from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NIH_SAMPLE = SHARED / "nih-sample"
NIH_METADATA = SHARED / "nih-metadata"


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    if not (NIH_SAMPLE / "Data_Entry_2017.csv").is_file():
        pytest.skip(f"real NIH sample not found at {NIH_SAMPLE} (the project's ../shared/nih-sample)")
    return NIH_SAMPLE


@pytest.fixture(scope="session")
def nih_metadata() -> Path:
    if not (NIH_METADATA / "Data_Entry_2017.csv").is_file():
        pytest.skip(f"full NIH metadata not found at {NIH_METADATA} (the project's ../shared/nih-metadata)")
    return NIH_METADATA


def write_tiny_nih(root: Path, num_patients: int = 12, images_per_patient: int = 3, size: int = 32,
                   seed: int = 0) -> Path:
    """A tiny NIH-layout dataset written by the tests themselves: random labels, and each
    finding brightens its own horizontal band, so a model has something to learn."""
    import numpy as np
    from PIL import Image

    from fedxray import LABELS
    rng = np.random.default_rng(seed)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    lines = [header]
    for p in range(1, num_patients + 1):
        for f in range(images_per_patient):
            name = f"{p:08d}_{f:03d}.png"
            y = rng.random(len(LABELS)) < 0.3
            img = rng.normal(90, 20, (size, size))
            for j in np.flatnonzero(y):
                img[(j * size) // len(LABELS)] += 120
            folder = root / f"images_{1 + p % 2:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name)
            labels = "|".join(n for n, on in zip(LABELS, y) if on) or "No Finding"
            lines.append(f"{name},{labels},{f},{p},{30 + p},{'MF'[p % 2]},{('PA', 'AP')[p % 3 == 0]},"
                         f"{size},{size},0.1,0.1")
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_nih(tmp_path_factory) -> Path:
    return write_tiny_nih(tmp_path_factory.mktemp("tiny_nih"))


@pytest.fixture()
def tiny_splits(tiny_nih):
    import fedxray
    meta = fedxray.load_nih(tiny_nih)
    return fedxray.split_by_patient(meta, val_fraction=0.2, seed=0, test_fraction=0.25)


def run_unfinished(config, splits, output_dir, **kwargs):
    """fedxray.run_federated stopped just before it ends (as by a kill after its last round): the
    last round's checkpoint.pt stays, not yet replaced by final_model.pt."""
    from fedxray.federated import FederatedRun, run_federated
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FederatedRun, "_save_final", lambda self: None)
        return run_federated(config, splits, output_dir, **kwargs)


def run_interrupted(cfg, splits, output_dir, at_round: int) -> None:
    """fedxray.run_federated interrupted (KeyboardInterrupt) as round at_round starts: the
    checkpoint of round at_round - 1 stays in output_dir."""
    from fedxray.federated import FederatedRun, run_federated
    real_round = FederatedRun._round

    def crash(self, r, progress):
        if r == at_round:
            raise KeyboardInterrupt("simulated interruption")
        return real_round(self, r, progress)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FederatedRun, "_round", crash)
        with pytest.raises(KeyboardInterrupt):
            run_federated(cfg, splits, output_dir)


def assert_resume_equals_uninterrupted(cfg, splits, tmp_path):
    """A run killed in round 3 and resumed ends bitwise where the uninterrupted run ends."""
    import pandas as pd
    import torch

    from fedxray.checkpoint import CHECKPOINT, load_checkpoint
    from fedxray.federated import run_federated
    full = run_federated(cfg, splits, tmp_path / "full")
    run_interrupted(cfg, splits, tmp_path / "resumed", at_round=3)
    assert load_checkpoint(tmp_path / "resumed" / CHECKPOINT)["round"] == 2
    resumed = run_federated(cfg, splits, tmp_path / "resumed")
    pd.testing.assert_frame_equal(full.history, resumed.history)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
