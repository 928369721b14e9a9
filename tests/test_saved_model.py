"""A finished run is one file: what was trained, its history and a reference to the trunk;
fedxray.load_model rebuilds the whole model from it and checks the trunk."""
import shutil

import pytest
import torch

import fedxray
from fedxray import CheckpointError, Config, run_federated
from fedxray.model import EXCHANGED_PREFIXES
from fedxray.saved_model import FINAL_MODEL, TRUNKS, load_final, load_model, trunk_file


def _config(**kw):
    base = dict(num_clients=2, num_rounds=1, batch_size=8, image_size=64, weights=None, eval_batch_size=16,
                progress=False)
    return Config(**{**base, **kw})


def _logits(model, n=4):
    x = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def test_load_model_rebuilds_the_trained_model(tiny_splits, tmp_path):
    res = run_federated(_config(), tiny_splits, tmp_path / "runs" / "a")
    path = tmp_path / "runs" / "a" / FINAL_MODEL
    rec = load_final(path)
    assert rec["state"] and all(k.startswith(EXCHANGED_PREFIXES) for k in rec["state"])   # no trunk inside
    loaded = fedxray.load_model(path)
    assert torch.equal(_logits(loaded), _logits(res.model))
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_the_random_trunk_is_stored_once_per_root_and_used_when_rebuilding_fails(tiny_splits, tmp_path, monkeypatch):
    root = tmp_path / "deep" / "root"                               # no other test's trunk within reach above
    a = run_federated(_config(), tiny_splits, root / "a")
    run_federated(_config(lr=1e-2), tiny_splits, root / "b")
    stored = list((root / TRUNKS).iterdir())
    digest = load_final(root / "a" / FINAL_MODEL)["trunk"]["digest"]
    assert [p.name for p in stored] == [trunk_file(digest)]             # one trunk for both runs
    # Another torch that initialises differently: the seed no longer rebuilds the trunk.
    monkeypatch.setattr(torch, "manual_seed", lambda seed: torch.random.default_generator.manual_seed(seed + 1))
    loaded = load_model(root / "a" / FINAL_MODEL)
    assert torch.equal(_logits(loaded), _logits(a.model))
    stored[0].unlink()
    with pytest.raises(CheckpointError, match=r"no trunk with digest.*weights=.*trunk="):
        load_model(root / "a" / FINAL_MODEL)


def test_a_finished_run_trains_nothing_when_run_again(tiny_splits, tmp_path, monkeypatch):
    first = run_federated(_config(num_rounds=2), tiny_splits, tmp_path)
    monkeypatch.setattr(fedxray.Client, "fit", lambda *a, **k: pytest.fail("a finished run trained again"))
    again = run_federated(_config(num_rounds=2), tiny_splits, tmp_path)
    assert again.history.equals(first.history)
    assert torch.equal(_logits(again.model), _logits(first.model))


def test_a_damaged_final_model_is_refused_naming_it(tiny_splits, tmp_path):
    from fedxray.checkpoint import payload_digest
    run_federated(_config(), tiny_splits, tmp_path)
    path = tmp_path / FINAL_MODEL
    rec = torch.load(path, weights_only=True)
    rec["state"]["fc.bias"][0] += 1.0
    torch.save(rec, path)
    with pytest.raises(CheckpointError, match=rf"{path} fails its checksum"):
        load_model(path)
    with pytest.raises(CheckpointError, match=rf"{path} fails its checksum"):
        run_federated(_config(), tiny_splits, tmp_path)             # the rerun does not trust it either
    rec["state"]["fc.bias"] = torch.zeros(3)                        # resealed, but not this model's shape
    rec["checksum"] = payload_digest({k: v for k, v in rec.items() if k != "checksum"})
    torch.save(rec, path)
    with pytest.raises(CheckpointError, match=r"fc.bias"):
        load_model(path)
    run_federated(_config(), tiny_splits, tmp_path, resume=False)  # the remedy works
    load_model(path)


def test_a_trunk_source_that_leads_back_to_itself_is_refused(tiny_splits, tmp_path):
    from fedxray.checkpoint import payload_digest
    out = tmp_path / "a" / "b" / "c"                                  # no stored trunk within reach above
    run_federated(_config(), tiny_splits, out)
    shutil.rmtree(out.parent / TRUNKS)
    path = out / FINAL_MODEL
    rec = torch.load(path, weights_only=True)
    rec["trunk"] = {**rec["trunk"], "source": f"file:{path}"}        # crafted: "my trunk is in me"
    rec["checksum"] = payload_digest({k: v for k, v in rec.items() if k != "checksum"})
    torch.save(rec, path)
    with pytest.raises(CheckpointError, match="no trunk with digest.*leads back"):
        load_model(path)
