"""The model: what is frozen, what travels, and where the weights come from."""
import urllib.error

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from fedxray import EXCHANGED_PREFIXES, build_model
from fedxray.model import TRUNK, bn_keys, exchanged_keys


def test_exchanged_and_frozen_parts():
    m = build_model(weights=None)
    assert EXCHANGED_PREFIXES == ("layer4.", "fc.")
    assert m.weights_source == "random"
    assert m.fc.out_features == 14
    keys = exchanged_keys(m)
    assert keys and all(k.startswith(EXCHANGED_PREFIXES) for k in keys)
    assert set(keys) == {k for k in m.state_dict() if k.startswith(("layer4.", "fc."))}
    # layer4's downsample BN is found by type although its name has no "bn"
    assert "layer4.0.downsample.1.running_mean" in bn_keys(m)
    assert not set(exchanged_keys(m, "bn")) & set(bn_keys(m))
    for name, p in m.named_parameters():
        assert p.requires_grad == name.startswith(EXCHANGED_PREFIXES), name
    ref = torchvision.models.resnet34(weights=None)
    n_trunk_bn = sum(isinstance(mod, torch.nn.BatchNorm2d) for n, mod in ref.named_modules() if n.startswith(TRUNK))
    trunk = [mod for n, mod in m.named_modules() if n.startswith(TRUNK)]
    assert sum(isinstance(mod, FrozenBatchNorm2d) for mod in trunk) == n_trunk_bn == 29
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in trunk)


def test_trunk_runs_without_autograd():
    m = build_model(weights=None)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    f = m.trunk(x)
    assert not f.requires_grad
    out = m.head(f)
    out.sum().backward()
    assert m.fc.weight.grad is not None and m.layer4[0].conv1.weight.grad is not None
    assert x.grad is None and m.conv1.weight.grad is None


def _resnet34_file(tmp_path, num_classes=1000):
    torch.manual_seed(1)
    ref = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    path = tmp_path / "resnet34.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_weights_from_local_file(tmp_path):
    ref, path = _resnet34_file(tmp_path)
    m = build_model(weights=str(path))
    assert m.weights_source == f"file:{path}"
    sd, rsd = m.state_dict(), ref.state_dict()
    for k in sd:
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(sd[k], rsd[k]), k
    assert m.fc.weight.shape == (14, 512)     # the 1000-class head is not used


def test_weights_file_with_our_head_and_wrapping(tmp_path):
    ref, path = _resnet34_file(tmp_path, num_classes=14)
    wrapped = tmp_path / "final_model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, wrapped)
    m = build_model(weights=str(wrapped))
    assert torch.equal(m.fc.weight, ref.fc.weight)


def test_bad_weights_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="junk.pth"):
        build_model(weights=str(tmp_path / "junk.pth"))
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="not a ResNet-34"):
        build_model(weights=str(tmp_path / "other.pth"))


RESNET34_FILE = "resnet34-b627a593.pth"   # torchvision's ResNet34_Weights.IMAGENET1K_V1


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """An empty torch hub cache of the test's own; returns its checkpoints folder."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("FEDXRAY_WEIGHTS", raising=False)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture()
def no_network(monkeypatch, hub):
    """ImageNet weights neither cached nor downloadable, as on a machine without internet. The
    download writes a few bytes before it fails, as a connection dropped midway would."""
    def refuse(url, dst, *a, **k):
        with open(dst, "wb") as f:
            f.write(b"half a file")
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return hub


def test_imagenet_unavailable_is_a_clear_error(no_network):
    with pytest.raises(RuntimeError, match="could not be loaded.*offline.*FEDXRAY_WEIGHTS"):
        build_model(weights="imagenet")
    assert list(no_network.iterdir()) == []                  # no partial file left in the hub cache


def test_auto_falls_back_loudly(no_network, caplog):
    with caplog.at_level("WARNING"):
        m = build_model(weights="auto")
    assert m.weights_source.startswith("random")
    assert "NO PRETRAINED WEIGHTS" in caplog.text


def test_failed_download_is_announced_before_the_warning_and_not_on_stdout(no_network, caplog, capsys):
    """torch.hub's own loader prints 'Downloading: ...' on stdout, which a notebook shows after the
    log's warning (stderr) that the download failed: fedxray logs the attempt itself, first."""
    with caplog.at_level("INFO", logger="fedxray.model"):
        build_model(weights="auto")
    assert "Downloading" not in capsys.readouterr().out
    messages = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "fedxray.model"]
    trying = [i for i, (level, text) in enumerate(messages) if level == "INFO" and "trying to download" in text]
    warned = [i for i, (level, text) in enumerate(messages) if level == "WARNING" and "NO PRETRAINED WEIGHTS" in text]
    assert len(trying) == len(warned) == 1 and trying[0] < warned[0]
    assert str(no_network / RESNET34_FILE) in messages[trying[0]][1]


def test_garbled_download_is_not_kept(hub, monkeypatch):
    def html(url, dst, *a, **k):                              # a proxy's login page, say
        open(dst, "wb").write(b"<html>sign in</html>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", html)
    with pytest.raises(RuntimeError, match="could not be loaded"):
        build_model(weights="imagenet")
    assert list(hub.iterdir()) == []


def test_auto_uses_env_file(no_network, monkeypatch, tmp_path):
    ref, path = _resnet34_file(tmp_path)
    monkeypatch.setenv("FEDXRAY_WEIGHTS", str(path))
    m = build_model(weights="auto")
    assert m.weights_source == f"file:{path}"
    assert torch.equal(m.conv1.weight, ref.conv1.weight)


def test_auto_prefers_imagenet_downloaded_into_the_hub_cache(hub, monkeypatch, tmp_path, capsys):
    ref, path = _resnet34_file(tmp_path)
    got, real = [], torch.hub.download_url_to_file

    def download(url, dst, hash_prefix=None, progress=True):  # torch's own download, from a local file
        got.append((url, progress))
        real(path.as_uri(), dst, hash_prefix, progress)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    m = build_model(weights="auto")
    assert capsys.readouterr() == ("", "")                    # no "Downloading:" line, no progress bar
    assert m.weights_source == "imagenet"
    assert torch.equal(m.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
    assert got == [(torchvision.models.ResNet34_Weights.IMAGENET1K_V1.url, False)]
    assert [p.name for p in hub.iterdir()] == [RESNET34_FILE]


def test_imagenet_weights_in_the_hub_cache_are_used_without_a_download(hub, monkeypatch, tmp_path, caplog,
                                                                         capsys):
    ref, _ = _resnet34_file(tmp_path)
    hub.mkdir(parents=True)
    torch.save(ref.state_dict(), hub / RESNET34_FILE)

    def no_download(*a, **k):
        pytest.fail("downloaded although the weights are in the hub cache")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with caplog.at_level("INFO", logger="fedxray.model"):
        m = build_model(weights="auto")
    assert m.weights_source == "imagenet"
    assert torch.equal(m.layer3[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert "download" not in caplog.text.lower() and capsys.readouterr().out == ""


def test_unreadable_file_in_the_hub_cache_names_it(hub):
    hub.mkdir(parents=True)
    (hub / RESNET34_FILE).write_bytes(b"junk")
    with pytest.raises(RuntimeError, match=f"{RESNET34_FILE}, cannot be read.*delete the file"):
        build_model(weights="imagenet")
