"""Client.fit against oracles: frozen parts stay put, one client equals centralized training,
FedAvg of one full-batch SGD step equals the full-batch step on the union."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Subset
from torchvision.ops.misc import FrozenBatchNorm2d

from fedxray import Client, NIHDataset, NonFiniteLossError, build_model, fedavg
from fedxray.client import derive_seed
from fedxray.model import EXCHANGED_PREFIXES, bn_keys, exchanged_keys, get_state


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(weights=None)


@pytest.fixture()
def train_ds(tiny_splits):
    return NIHDataset(tiny_splits["train"], image_size=32, preload=True)


def test_fit_changes_only_layer4_and_fc(train_ds):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client = Client(0, train_ds, model, local_epochs=1, batch_size=8, lr=1e-2)
    update = client.fit(get_state(model, exchanged_keys(model)), round_num=1)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(EXCHANGED_PREFIXES):
            continue
        assert torch.equal(v, after[k]), f"frozen {k} changed"          # bitwise
    assert set(update.state) == set(exchanged_keys(model))
    for k in ("layer4.0.conv1.weight", "fc.weight", "fc.bias", "layer4.2.bn2.running_mean"):
        assert not torch.equal(before[k], update.state[k]), f"{k} did not train"
    assert update.num_examples == len(train_ds)
    assert update.train_loss > 0


def test_update_is_a_copy(train_ds):
    model = _model()
    client = Client(0, train_ds, model, batch_size=8)
    update = client.fit(get_state(model, exchanged_keys(model)), round_num=1)
    saved = update.state["fc.weight"].clone()
    client.fit(update.state, round_num=2)                     # the shared model trains on
    assert torch.equal(update.state["fc.weight"], saved)


def test_one_client_one_round_equals_centralized_training(train_ds):
    """One client holding all the data equals a plain training loop, bitwise on CPU."""
    epochs, bs, lr, seed = 2, 8, 1e-3, 3
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    client = Client(0, train_ds, model, local_epochs=epochs, batch_size=bs, lr=lr, optimizer="adam", seed=seed)
    update = client.fit(get_state(model, exchanged_keys(model)), round_num=1)
    merged = fedavg([update.state], [update.num_examples])

    ref = _model()
    ref.load_state_dict(init)
    ref.train()
    opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(derive_seed(seed, 1, 0))
    loader = DataLoader(train_ds, batch_size=bs, shuffle=True, generator=gen)
    total, seen = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(ref(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            seen += len(y)
    ref_state = ref.state_dict()
    for k, v in merged.items():
        assert torch.equal(v, ref_state[k]), k
    assert update.train_loss == pytest.approx(total / seen, rel=1e-12)


def _freeze_layer4_bn(model):
    """Batch statistics make a BN forward depend on batch composition; with layer4's BN frozen
    the network is per-example, so FedAvg of full-batch steps is exactly the union's step."""
    for block in model.layer4:
        for name, mod in list(block.named_modules()):
            if isinstance(mod, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(mod.num_features, eps=mod.eps)
                frozen.load_state_dict({k: v for k, v in mod.state_dict().items() if k != "num_batches_tracked"})
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                setattr(parent, name.rpartition(".")[2], frozen)
    return model


def test_fedavg_of_full_batch_sgd_steps_equals_one_step_on_the_union(train_ds):
    lr, sizes = 0.05, [5, 7, len(train_ds) - 12]
    bounds = [0, 5, 12, len(train_ds)]
    parts = [Subset(train_ds, range(a, b)) for a, b in zip(bounds, bounds[1:])]
    assert [len(p) for p in parts] == sizes
    model = _freeze_layer4_bn(_model())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    glob = get_state(model, exchanged_keys(model))
    updates = [Client(k, p, model, batch_size=len(p), lr=lr, optimizer="sgd", momentum=0.0).fit(glob, 1)
               for k, p in enumerate(parts)]
    merged = fedavg([u.state for u in updates], [u.num_examples for u in updates])

    ref = _freeze_layer4_bn(_model())
    ref.load_state_dict(init)
    union = ConcatDataset(parts)
    x, y = next(iter(DataLoader(union, batch_size=len(union))))
    F.binary_cross_entropy_with_logits(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p -= lr * p.grad
    ref_state = ref.state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(merged["fc.weight"], init["fc.weight"])


def test_client_training_is_independent_of_order(train_ds):
    half = len(train_ds) // 2
    parts = [Subset(train_ds, range(half)), Subset(train_ds, range(half, len(train_ds)))]
    model = _model()
    glob = get_state(model, exchanged_keys(model))
    clients = [Client(k, p, model, batch_size=4, seed=7) for k, p in enumerate(parts)]
    forward = [c.fit(glob, 3).state for c in clients]
    backward = [c.fit(glob, 3).state for c in reversed(clients)][::-1]
    for a, b in zip(forward, backward):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    other_round = clients[0].fit(glob, 4).state
    assert not torch.equal(other_round["fc.weight"], forward[0]["fc.weight"])


def test_fedbn_keeps_layer4_batchnorm_local(train_ds):
    model = _model()
    keys = exchanged_keys(model, "bn")
    client = Client(0, train_ds, model, batch_size=8, local_keys="bn")
    initial_bn = dict(client.local_state)
    update = client.fit(get_state(model, keys), round_num=1)
    assert not set(update.state) & set(bn_keys(model))
    assert set(client.local_state) == set(bn_keys(model))
    moved = client.local_state["layer4.0.bn1.running_mean"]
    assert not torch.equal(moved, initial_bn["layer4.0.bn1.running_mean"])
    with pytest.raises(KeyError, match="does not match the exchanged keys"):
        client.fit(get_state(model, exchanged_keys(model)), round_num=2)   # BN keys must not arrive


class _Poisoned(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x * float("inf"), y


def test_non_finite_loss_stops_with_a_clear_error(train_ds):
    model = _model()
    client = Client(4, _Poisoned(train_ds), model, batch_size=8)
    with pytest.raises(NonFiniteLossError, match="client 4, round 2"):
        client.fit(get_state(model, exchanged_keys(model)), round_num=2)
