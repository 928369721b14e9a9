"""What a run reads back from its own folder: checkpoints that cannot run code, fail their checksum
when damaged, and resume only the run that wrote them; divergence caught where it happens; one
process per output folder; the local-only baseline on the same rows as FedAvg."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedxray
from fedxray import CheckpointError, Config, DivergenceError, run_federated, run_local_only
from fedxray.checkpoint import CHECKPOINT, FINAL_MODEL, FINAL_RESULT, load_checkpoint
from fedxray.saved_model import load_final
from fedxray.device import predict
from fedxray.federated import FederatedRun
from fedxray.parts import prepare
from fedxray.io import LockedError, file_lock

from conftest import run_unfinished, write_tiny_nih


def _config(**kw):
    base = dict(num_clients=2, num_rounds=1, batch_size=8, lr=1e-3, image_size=64, weights=None,
                preload=True, progress=False, eval_batch_size=64, seed=0)
    return Config(**{**base, **kw})


class RunsCode:
    """What an attacker puts in a pickle: unpickling it calls exec on the attacker's text."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_crafted_checkpoint_runs_no_code(tiny_splits, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"format": 2, "round": 1, "global_state": RunsCode(marker)}, out / CHECKPOINT)
    # The file is a real attack: the first release's torch.load(weights_only=False) runs it.
    torch.load(out / CHECKPOINT, weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"(?s)checkpoint.pt.*none of it ran.*resume=False"):
        run_federated(_config(), tiny_splits, out)                  # resume=True is the default
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(out / CHECKPOINT)
    assert not marker.exists()


def test_truncated_and_damaged_checkpoints_name_the_file_and_the_remedy(tiny_splits, tmp_path):
    run_unfinished(_config(), tiny_splits, tmp_path / "a")
    path = tmp_path / "a" / CHECKPOINT
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])                        # SIGKILL-like truncation
    with pytest.raises(CheckpointError, match=rf"(?s){path}.*corrupt or truncated.*resume=False"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(path)):
        run_federated(_config(), tiny_splits, tmp_path / "a")

    # One value changed inside a tensor, the file otherwise well formed: only the checksum sees it.
    payload = torch.load(io_bytes(good), weights_only=True)
    w = payload["global_state"]["fc.weight"]
    w.view(torch.int32)[0, 0] ^= 1                                  # one flipped bit
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"{path} fails its checksum"):
        run_federated(_config(), tiny_splits, tmp_path / "a")

    # Raw bytes flipped in the middle of the file: refused, whichever check sees it first.
    raw = bytearray(good)
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    run_federated(_config(), tiny_splits, tmp_path / "a", resume=False)   # the remedy works


def io_bytes(data: bytes):
    import io
    return io.BytesIO(data)


def test_damaged_final_model_is_refused_as_weights(tiny_splits, tmp_path):
    run_federated(_config(), tiny_splits, tmp_path)
    path = tmp_path / FINAL_MODEL
    fedxray.build_model(weights=str(path))                          # intact: loads
    payload = torch.load(path, weights_only=True)
    payload["state"]["layer4.0.conv1.weight"].view(torch.int32).reshape(-1)[7] ^= 1 << 20
    torch.save(payload, path)
    with pytest.raises(RuntimeError, match="fails its checksum"):
        fedxray.build_model(weights=str(path))


def test_resume_refuses_other_data_and_says_what_changed(tiny_splits, tmp_path):
    run_federated(_config(), tiny_splits, tmp_path)
    fewer_test = {**tiny_splits, "test": tiny_splits["test"].iloc[1:]}
    with pytest.raises(CheckpointError, match=r"other images or labels for test") as e:
        run_federated(_config(), fewer_test, tmp_path)
    assert "client_" not in str(e.value) and "val" not in str(e.value)
    relabelled = tiny_splits["train"].copy()
    relabelled.loc[0, "Hernia"] = 1 - relabelled.loc[0, "Hernia"]
    with pytest.raises(CheckpointError, match=r"other images or labels for client_\d"):
        run_federated(_config(), {**tiny_splits, "train": relabelled}, tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["round"].max() == 1                              # nothing was mixed in


def test_resume_refuses_a_changed_weights_file(tiny_splits, tmp_path):
    weights = tmp_path / "resnet34.pth"
    torch.manual_seed(1)
    torch.save(fedxray.build_model(weights=None).state_dict(), weights)
    cfg = _config(weights=str(weights), num_rounds=2)
    run = FederatedRun(prepare(cfg, tiny_splits), tmp_path / "run")
    run._start_fresh()                                              # round 0 written, as after a kill
    torch.manual_seed(2)
    torch.save(fedxray.build_model(weights=None).state_dict(), weights)   # same path, other weights
    with pytest.raises(CheckpointError, match="another frozen trunk"):
        run_federated(cfg, tiny_splits, tmp_path / "run")


def test_orphan_temporaries_of_an_interrupted_write_are_removed(tiny_splits, tmp_path):
    tmp_path.joinpath(".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    tmp_path.joinpath(".history.csv.x.tmp").write_text("round,")
    tmp_path.joinpath("notes.tmp").write_text("not ours")
    run_federated(_config(), tiny_splits, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.tmp")) == ["notes.tmp"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_process_in_the_same_output_dir_is_refused(tiny_splits, tmp_path):
    with file_lock(tmp_path / ".lock"):                             # as another process would hold it
        with pytest.raises(LockedError, match=rf"{tmp_path}.*another process"):
            run_federated(_config(), tiny_splits, tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()
    run_federated(_config(), tiny_splits, tmp_path)                 # free again once released


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_divergence_is_named_where_it_happens(tiny_splits, tmp_path, optimizer):
    # The first release averaged SGD's diverged weights and failed later in the AUROC code, and let
    # Adam's training loss of 1e13 pass without a word.
    with pytest.raises(DivergenceError, match=r"client \d, round 1: training loss .*lower lr.*checkpoint "
                                              r"of round 0"):
        run_federated(_config(optimizer=optimizer, lr=1e6, num_rounds=2), tiny_splits, tmp_path)
    assert load_checkpoint(tmp_path / CHECKPOINT)["round"] == 0


def test_non_finite_predictions_are_divergence_not_a_metrics_error(tiny_splits):
    run = FederatedRun(prepare(_config(), tiny_splits), "unused")
    with torch.no_grad():
        run.model.fc.weight[:, ::2] = 3e38                          # finite weights whose logits are
        run.model.fc.weight[:, 1::2] = -3e38                        # inf - inf = NaN
    with pytest.raises(DivergenceError, match="non-finite predictions"):
        predict(run.model, run.parts.val_data, 64, torch.device("cpu"))


def test_nan_from_the_server_is_blamed_on_the_server(tiny_splits):
    run = FederatedRun(prepare(_config(), tiny_splits), "unused")
    state = {**run.global_state, "fc.bias": torch.full((14,), float("nan"))}
    with pytest.raises(ValueError, match="server's model is corrupt"):
        run.clients[0].fit(state, round_num=3)


def test_damaged_cached_features_are_blamed_on_the_cache(tiny_splits, tmp_path):
    from fedxray.features import FeatureCache
    run = FederatedRun(prepare(_config(), tiny_splits), "unused")
    frame = run.client_frames[0]
    features = torch.randn(len(frame), 256, 4, 4)
    features[3, 0, 0, 0] = float("inf")
    cache = FeatureCache(features, frame["image"], "key", "trunk", torch.device("cpu"), path=None)
    client = fedxray.Client(0, cache.dataset(frame), run.model, batch_size=8)
    with pytest.raises(fedxray.DataError, match="cached features are damaged"):
        client.fit(run.global_state, round_num=1)


def test_local_only_partitions_the_same_usable_rows_as_fedavg(tmp_path):
    root = write_tiny_nih(tmp_path / "nih", num_patients=16, images_per_patient=2)
    meta = fedxray.load_nih(root)
    splits = fedxray.split_by_patient(meta, val_fraction=0.2, seed=0, test_fraction=0.25)
    broken = Path(splits["train"]["path"].iloc[5])
    broken.write_bytes(broken.read_bytes()[:40])                    # undecodable: the cache excludes it
    cfg = _config(image_cache=True, cache_dir=str(tmp_path / "cache"), preload=False)
    fed = FederatedRun(prepare(cfg, splits), tmp_path / "fedavg")
    assert sum(len(f) for f in fed.client_frames) == len(splits["train"]) - 1
    run_local_only(cfg, splits, tmp_path / "local")
    for k, frame in enumerate(fed.client_frames):
        info = json.loads((tmp_path / "local" / f"client_{k}" / "run_info.json").read_text())
        assert info["client_examples"] == [len(frame)], k
        ckpt = load_final(tmp_path / "local" / f"client_{k}" / FINAL_RESULT)
        assert not ckpt["state"] and ckpt["round"] == cfg.num_rounds      # the local models are not kept
        assert ckpt["inputs"]["client_0"] == fedxray.checkpoint.image_list_digest(frame)


def test_a_first_release_checkpoint_is_refused_with_its_reason(tiny_splits, tmp_path):
    # What the first release wrote: numpy's RNG state pickled beside the tensors.
    torch.save({"round": 1, "global_state": {}, "rng": {"numpy": np.random.get_state()}},
               tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="first release.*none of it ran.*resume=False"):
        run_federated(_config(), tiny_splits, tmp_path)


def test_a_checkpoint_from_a_newer_config_names_the_file(tiny_splits, tmp_path):
    from fedxray.checkpoint import payload_digest
    run_unfinished(_config(), tiny_splits, tmp_path)
    payload = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    payload["config"] = json.dumps({**json.loads(payload["config"]), "clip_norm": 1.0})
    payload["checksum"] = payload_digest({k: v for k, v in payload.items() if k != "checksum"})
    torch.save(payload, tmp_path / CHECKPOINT)                      # intact, but from another version
    with pytest.raises(CheckpointError, match=rf"{tmp_path / CHECKPOINT} holds a configuration.*clip_norm"):
        run_federated(_config(), tiny_splits, tmp_path)


def test_old_torch_is_refused_before_reading(tiny_splits, tmp_path, monkeypatch):
    run_unfinished(_config(), tiny_splits, tmp_path)
    run_federated(_config(), tiny_splits, tmp_path / "done")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(CheckpointError, match=r"torch 2.5.1\+cu121.*CVE-2025-32434.*torch>=2.6"):
        load_checkpoint(tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="CVE-2025-32434"):
        fedxray.build_model(weights=str(tmp_path / "done" / FINAL_MODEL))


def test_preload_is_how_a_run_executes_not_what_it_computes(tiny_splits, tmp_path):
    run_federated(_config(num_rounds=1), tiny_splits, tmp_path)
    res = run_federated(_config(num_rounds=1, preload=False), tiny_splits, tmp_path)   # resumes
    assert res.history["round"].max() == 1


def test_local_only_holds_its_folder(tiny_splits, tmp_path):
    with file_lock(tmp_path / ".lock"):
        with pytest.raises(LockedError):
            run_local_only(_config(), tiny_splits, tmp_path)
    assert not (tmp_path / "history.csv").exists()
