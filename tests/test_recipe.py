"""The training recipe: the learning-rate schedule by round, pos_weight from the federation's label
counts, weight decay, and augmentation refused with the feature cache."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedxray import LABELS, Config
from fedxray.client import Client, scheduled_lr
from fedxray.model import build_model
from fedxray.objectives import label_counts, pos_weight_from_counts


@pytest.mark.parametrize("rounds, schedule, expected", [
    (4, "constant", [1.0, 1.0, 1.0, 1.0]),
    # lr * (1 + cos(pi * (r - 1) / R)) / 2
    (4, "cosine", [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]),
    (8, "step", [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]),        # /10 after half, /100 after three quarters
    (10, "step", [1] * 5 + [0.1] * 2 + [0.01] * 3),         # 10 // 2 = 5, 30 // 4 = 7
    (2, "step", [1, 0.1]),
    (1, "step", [1]),
    (1, "cosine", [1]),
])
def test_the_schedule_gives_the_stated_learning_rate_each_round(rounds, schedule, expected):
    got = [scheduled_lr(2e-3, schedule, r, rounds) for r in range(1, rounds + 1)]
    np.testing.assert_allclose(got, 2e-3 * np.array(expected, dtype=float), rtol=1e-12)


def test_the_schedule_refuses_unknown_names_and_rounds():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        scheduled_lr(1e-3, "linear", 1, 3)
    with pytest.raises(ValueError, match="outside the run's rounds"):
        scheduled_lr(1e-3, "cosine", 4, 3)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        Config(lr_schedule="exponential")


def test_the_client_optimizer_uses_the_scheduled_rate(monkeypatch):
    """What the optimizer is built with, in each round, is the schedule's value."""
    import fedxray.client as client_mod
    seen = []
    real = client_mod.make_optimizer
    monkeypatch.setattr(client_mod, "make_optimizer", lambda params, name, lr, *a, **k: seen.append(lr) or
                        real(params, name, lr, *a, **k))
    torch.manual_seed(0)
    model = build_model(len(LABELS), weights=None)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 64, 64), torch.randint(0, 2, (4, 14)).float())
    client = Client(0, data, model, batch_size=4, lr=1e-2, lr_schedule="cosine", num_rounds=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in client.keys}
    for r in (1, 2, 3):
        client.fit(state, round_num=r)
    np.testing.assert_allclose(seen, [scheduled_lr(1e-2, "cosine", r, 3) for r in (1, 2, 3)])
    with pytest.raises(ValueError, match="needs the run's num_rounds"):
        Client(0, data, model, lr_schedule="step")


def _frames(seed=0, sizes=(30, 7, 55)):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        p = rng.uniform(0.0, 0.3, len(LABELS))
        y = (rng.random((n, len(LABELS))) < p).astype(np.uint8)
        y[:, LABELS.index("Hernia")] = 0                      # a finding no client has
        out.append(pd.DataFrame(y, columns=list(LABELS)).assign(image=[f"{i}.png" for i in range(n)]))
    return out


def test_pos_weight_from_counts_equals_pos_weight_from_pooled_labels():
    frames = _frames()
    pooled = pd.concat(frames).loc[:, list(LABELS)].to_numpy(float)
    pos = pooled.sum(0)
    expected = np.where(pos > 0, (len(pooled) - pos) / np.maximum(pos, 1), 1.0)   # negatives / positives
    got = pos_weight_from_counts(label_counts(f) for f in frames)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert got[LABELS.index("Hernia")] == 1.0                                     # no positive anywhere: 1
    # Per-client weights differ from the federation's under skew (the docstring's point).
    own = pos_weight_from_counts([label_counts(frames[1])])
    assert not torch.allclose(own, got)
    # The loss it weighs: torch's BCE with this pos_weight on pooled labels.
    logits = torch.randn(len(pooled), len(LABELS))
    y = torch.tensor(pooled, dtype=torch.float32)
    manual = -(got * y * torch.nn.functional.logsigmoid(logits) + (1 - y) * torch.nn.functional.logsigmoid(-logits))
    torch.testing.assert_close(torch.nn.BCEWithLogitsLoss(pos_weight=got)(logits, y), manual.mean())


def test_pos_weight_reaches_every_client_of_a_run(tiny_splits):
    from fedxray.parts import centralized, prepare
    config = Config(num_clients=2, num_rounds=1, image_size=64, weights=None, preload=True, progress=False,
                    pos_weight=True)
    parts = prepare(config, tiny_splits)
    expected = pos_weight_from_counts(label_counts(f) for f in parts.client_frames)
    for cl in parts.clients:
        torch.testing.assert_close(cl.pos_weight, expected)
    torch.testing.assert_close(centralized(parts).clients[0].pos_weight, expected)   # pooled = federation
    assert prepare(Config(**{**config.to_dict(), "pos_weight": False}), tiny_splits).clients[0].pos_weight is None


def test_bad_label_counts_are_refused():
    with pytest.raises(ValueError, match="at least one client"):
        pos_weight_from_counts([])
    with pytest.raises(ValueError, match="inconsistent"):
        pos_weight_from_counts([(3, np.full(len(LABELS), 5))])
    with pytest.raises(ValueError, match="14 finding columns"):
        label_counts(np.zeros((3, 5)))


def test_augmentation_with_the_feature_cache_is_refused_by_name():
    with pytest.raises(ValueError, match="augment=True and feature_cache=True"):
        Config(augment=True, feature_cache=True)
    # The demo's default feature cache yields to an explicit augment; an explicit cache does not.
    assert Config.for_dataset("demo", augment=True, feature_cache=None).feature_cache is False
    assert Config.for_dataset("demo", augment=False, feature_cache=None).feature_cache is True
    with pytest.raises(ValueError, match="augment=True and feature_cache=True"):
        Config.for_dataset("demo", augment=True, feature_cache=True)


def test_weight_decay_is_checked_and_reaches_the_optimizer():
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        Config(weight_decay=-1e-4)
    torch.manual_seed(0)
    model = build_model(len(LABELS), weights=None)
    data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 64, 64), torch.zeros(2, 14))
    client = Client.from_config(0, data, model, Config(weight_decay=1e-4, image_size=64, weights=None),
                                torch.device("cpu"))
    assert client.weight_decay == 1e-4
