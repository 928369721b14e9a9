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
