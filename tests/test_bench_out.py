"""Where `python -m fedxray.bench` writes its JSON when --out is not given (the benchmark is not run)."""
import json
from pathlib import Path

import torch

from fedxray import bench

from conftest import ROOT


def test_default_out_is_the_repository_data_folder():
    assert (ROOT / "data").is_dir()
    assert bench.default_out() == ROOT / "data" / "bench.json"


def test_default_out_outside_a_checkout_is_the_current_directory(tmp_path):
    (tmp_path / "site-packages" / "fedxray").mkdir(parents=True)
    assert bench.default_out(tmp_path / "site-packages" / "fedxray") == Path("bench.json")


def test_main_writes_to_the_default_and_says_where(tmp_path, monkeypatch, capsys):
    out = tmp_path / "data" / "bench.json"
    monkeypatch.setattr(bench, "default_out", lambda: out)
    monkeypatch.setattr(bench, "run", lambda *a, **k: {"mode": "stub"})
    monkeypatch.setattr(bench, "table", lambda result: "the table")
    assert bench.main(["--smoke", "--threads", str(torch.get_num_threads()), "--workdir", str(tmp_path)]) == 0
    assert json.loads(out.read_text())["mode"] == "stub"
    assert f"JSON written to {out}" in capsys.readouterr().out


def test_augment_cost_compares_the_paired_image_cache_rows():
    throughput = {"image_cache": {"images_per_s": 50.0}, "image_cache_augment": {"images_per_s": 40.0}}
    cost = bench.augment_cost(throughput, {"images_per_s": 4000.0, "repeats": [4000.0]})
    assert cost["throughput_ratio"] == 0.8
    assert abs(cost["added_us_per_image"] - 5000.0) < 1e-6     # 1/40 - 1/50 s
    assert cost["alone_us_per_image"] == 250.0
    assert cost["augmentation"]["rotation_deg"] == 7.0
