"""Differential privacy: clipping, DP-FedAvg's aggregate and noise, the accountant against published
values, per-patient DP-SGD against plain autograd, layer4's GroupNorm, Config's refusals, and
the epsilon a run reports."""
import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

pytest.importorskip("opacus", reason="differential privacy needs opacus (requirements-privacy.txt)")

import fedxray  # noqa: E402
from fedxray import Config  # noqa: E402
from fedxray.aggregation import fedavg  # noqa: E402
from fedxray.client import Client, ClientUpdate, derive_seed  # noqa: E402
from fedxray.dpsgd import (PatientDPSGD, PatientDPSpec, per_example_bce, poisson_patient_batches,  # noqa: E402
                           steps_per_round)
from fedxray.federated import run_federated  # noqa: E402
from conftest import assert_resume_equals_uninterrupted  # noqa: E402
from fedxray.model import bn_keys, build_model, exchanged_keys, private_norm, get_state  # noqa: E402
from fedxray.parts import model_for  # noqa: E402
from fedxray.privacy import (ClientDPSpec, ClientLevelDP, clip, clipped_state, epsilon, flat_delta,  # noqa: E402
                             noise_for_epsilon, poisson_clients)
from fedxray.strategies import make_strategy  # noqa: E402

TINY = dict(num_clients=2, num_rounds=2, batch_size=8, image_size=64, weights=None, preload=True,
            progress=False, eval_batch_size=64, seed=0, test_every_round=False)


def _state(g, shapes={"a": (40, 30), "b": (7,)}, scale=1.0):
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


# ---------------------------------------------------------------------- clipping
def test_clip_scales_a_long_vector_to_the_bound_and_keeps_its_direction():
    v = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = v * (10 / torch.linalg.vector_norm(v))
    out, norm = clip(v, 1.0)
    assert norm == pytest.approx(10.0)
    assert float(torch.linalg.vector_norm(out)) == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(out * 10, v, rtol=1e-12, atol=0)          # same direction
    short = v * (0.5 / 10)
    same, _ = clip(short, 1.0)
    assert torch.equal(same, short)                                  # under the bound: unchanged


def test_clipped_state_bounds_the_update_over_all_entries_as_one_vector():
    g = torch.Generator().manual_seed(1)
    glob, state = _state(g), _state(g)
    out, norm = clipped_state(state, glob, 0.5)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(flat_delta(state, glob, list(glob)))))
    assert float(torch.linalg.vector_norm(flat_delta(out, glob, list(glob)))) == pytest.approx(0.5, rel=1e-6)
    for k in glob:   # one scale for every entry: the direction of the whole update is kept
        moved, wanted = out[k].double() - glob[k].double(), (state[k].double() - glob[k].double()) * (0.5 / norm)
        assert torch.allclose(moved, wanted, atol=1e-6, rtol=0), k
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in state.items()}


# ---------------------------------------------------------------------- DP-FedAvg
def _dp(strategy="fedavg", noise=0.0, clip_norm=math.inf, q=1.0, num_clients=4, seed=0):
    inner = make_strategy(strategy, num_clients=num_clients)
    return ClientLevelDP(inner, ClientDPSpec(noise, clip_norm, q, 10, 1e-5), seed)


def test_no_noise_and_no_clip_is_unweighted_fedavg_exactly():
    g = torch.Generator().manual_seed(2)
    glob = _state(g)
    states = [_state(g) for _ in range(4)]
    updates = [ClientUpdate(state=s, num_examples=n, train_loss=0.1, client_id=k)
               for k, (s, n) in enumerate(zip(states, [5, 50, 500, 5000]))]
    got = _dp().aggregate(glob, updates, 1)
    expected = fedavg(states, [1, 1, 1, 1])              # unweighted: the example counts play no part
    for k in glob:
        assert torch.equal(got[k], expected[k]), k
    weighted = fedavg(states, [5, 50, 500, 5000])
    assert not torch.allclose(got["a"], weighted["a"])


def test_each_update_is_clipped_at_the_server_too():
    g = torch.Generator().manual_seed(3)
    glob = _state(g)
    states = [_state(g, scale=10.0) for _ in range(2)]
    updates = [ClientUpdate(state=s, num_examples=1, train_loss=0.1, client_id=k) for k, s in enumerate(states)]
    got = _dp(clip_norm=1.0, num_clients=2).aggregate(glob, updates, 1)
    clipped = [clipped_state(s, glob, 1.0)[0] for s in states]
    expected = fedavg(clipped, [1, 1])
    for k in glob:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k


def test_server_noise_has_the_stated_standard_deviation():
    """z * C on the sum, divided by the expected clients q * K: on zero updates the new state minus
    the old is pure noise of standard deviation z * C / (q * K)."""
    shapes = {"w": (300, 400)}
    glob = {"w": torch.zeros(300, 400)}
    z, c, q, k = 0.7, 2.0, 0.5, 4
    dp = _dp(noise=z, clip_norm=c, q=q, num_clients=k)
    updates = [ClientUpdate(state={"w": torch.zeros(shapes["w"])}, num_examples=1, train_loss=0.0, client_id=i)
               for i in range(2)]
    step = dp.aggregate(glob, updates, 1)["w"].double()
    assert float(step.mean()) == pytest.approx(0.0, abs=4 * z * c / (q * k) / math.sqrt(step.numel()))
    assert float(step.std()) == pytest.approx(z * c / (q * k), rel=0.01)
    again = dp.aggregate(glob, updates, 1)["w"]
    assert torch.equal(again, step.float())                       # seeded by (seed, round): reproducible
    assert not torch.equal(dp.aggregate(glob, updates, 2)["w"], again)   # fresh noise each round
    empty = dp.aggregate(glob, [], 3)["w"]                       # a Poisson round with nobody: noise only
    assert float(empty.double().std()) == pytest.approx(z * c / (q * k), rel=0.01)


def test_the_noised_mean_feeds_the_wrapped_server_optimizer():
    g = torch.Generator().manual_seed(4)
    glob, state = _state(g), _state(g)
    u = [ClientUpdate(state=state, num_examples=3, train_loss=0.1, client_id=0)]
    dp = _dp("fedavgm", num_clients=1)
    plain = make_strategy("fedavgm", num_clients=1)
    got, expected = dp.aggregate(glob, u, 1), plain.aggregate(glob, [dataclasses.replace(u[0], num_examples=1)], 1)
    for k in glob:
        assert torch.allclose(got[k], expected[k], atol=1e-6)
    assert dp.state_dict()["momentum_vector"] is not None       # its server state moved, and checkpoints


def test_poisson_client_sampling_takes_each_client_with_the_rate_and_may_take_none():
    rounds = [poisson_clients(10, 0.3, 0, r) for r in range(1, 2001)]
    share = np.mean([len(c) for c in rounds]) / 10
    assert share == pytest.approx(0.3, abs=0.01)
    assert any(len(c) == 0 for c in [poisson_clients(3, 0.2, 0, r) for r in range(1, 200)])
    assert poisson_clients(10, 0.3, 0, 5) == poisson_clients(10, 0.3, 0, 5)
    assert poisson_clients(10, 1.0, 0, 5) == list(range(10))


# ---------------------------------------------------------------------- accountant
def test_accountant_reproduces_opacus_documented_value():
    """Opacus's own test (opacus/tests/accountants_test.py, test_rdp_accountant, in 1.5 and 1.6):
    sigma 1.5, q 0.04, int(90 / 0.04) steps, delta 1e-5 -> epsilon 7.32911117143."""
    assert epsilon(1.5, 0.04, int(90 / 0.04), 1e-5) == pytest.approx(7.32911117143, abs=1e-9)


def test_noise_for_a_target_epsilon_reaches_it_from_below():
    """Its contract: the epsilon of the noise found is at most the target and within the search's
    0.01 of it (opacus 1.6.0's own test expects 1.416 here, at 4 places)."""
    noise = noise_for_epsilon(8.0, 1e-5, 0.04, int(90 / 0.04))
    assert 8.0 - 0.01 <= epsilon(noise, 0.04, int(90 / 0.04), 1e-5) <= 8.0
    assert noise == pytest.approx(1.416, abs=0.01)


def test_accountant_is_within_abadi_et_al_moments_accountant_bound():
    """Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10000 steps gives
    epsilon ~ 1.26 by the moments accountant (9.34 by strong composition). RDP is at least as tight."""
    eps = epsilon(4.0, 0.01, 10000, 1e-5)
    assert 0.9 < eps <= 1.26


def test_epsilon_edges():
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 5, 1e-5) == math.inf
    assert epsilon(1.0, 0.1, 200, 1e-5) > epsilon(1.0, 0.1, 100, 1e-5) > epsilon(2.0, 0.1, 100, 1e-5)


# ---------------------------------------------------------------------- per-patient DP-SGD
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return private_norm(build_model(14, None))


def test_per_patient_gradients_are_clipped_per_patient_not_per_image():
    """grads() against plain autograd: each patient's mean-loss gradient, clipped, summed, divided
    by q * P (noise 0)."""
    model = _tiny_model()
    x = torch.randn(6, 256, 4, 4, generator=torch.Generator().manual_seed(5))
    y = (torch.rand(6, 14, generator=torch.Generator().manual_seed(6)) < 0.3).float()
    codes = np.array([0, 0, 0, 1, 2, 2])
    spec = PatientDPSpec(noise_multiplier=0.0, clip_norm=0.05, sample_rate=0.5, steps_per_round=1, delta=1e-5)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = per_example_bce()
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for p_id in range(3):
        model.zero_grad()
        rows = np.flatnonzero(codes == p_id)
        loss(model.head(x[rows]), y[rows]).mean().backward()
        g = {n: p.grad.clone() for n, p in params.items()}
        norm = math.sqrt(sum(float(t.double().square().sum()) for t in g.values()))
        norms.append(norm)
        for n in g:
            expected[n] += g[n] * min(1.0, 0.05 / norm)
    assert min(norms) > 0.05                                       # every patient is clipped here
    model.zero_grad()
    dp = PatientDPSGD(spec, codes, chunk=4)                        # patient 2 straddles two chunks
    gsm = dp.attach(model)
    try:
        dp.grads(params, np.arange(6), lambda i: (x[i], y[i]), lambda a, b: loss(model.head(a), b),
                 torch.Generator(), torch.device("cpu"))
    finally:
        dp.detach(gsm)
    for n, p in params.items():
        assert torch.allclose(p.grad, expected[n] / (0.5 * 3), atol=1e-7, rtol=1e-4), n
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params.values())


class _Images(torch.utils.data.Dataset):
    """Random layer3-sized inputs with a frame of patients (is_features: only model.head runs)."""
    is_features = True

    def __init__(self, n=14, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 256, 4, 4, generator=g)
        self.y = (torch.rand(n, 14, generator=g) < 0.3).float()
        self.frame = pd.DataFrame({"patient_id": [1, 1, 2, 3, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9][:n]})

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def batch(self, idx):
        return self.x[idx], self.y[idx]


def test_dp_sgd_without_noise_and_clip_is_plain_training_on_the_same_poisson_batches():
    data = _Images()
    model = _tiny_model()
    glob = get_state(model, exchanged_keys(model))
    q, steps = steps_per_round(len(data), 4, 1)
    spec = PatientDPSpec(noise_multiplier=0.0, clip_norm=1e9, sample_rate=q, steps_per_round=steps, delta=1e-5)
    # SGD: Adam divides by sqrt(v), which turns float rounding of near-zero gradients into +-lr steps
    client = Client(0, data, model, batch_size=4, lr=0.05, optimizer="sgd", momentum=0.0, dp_sgd=spec, seed=3)
    got = client.fit(glob, round_num=2)
    assert math.isnan(got.train_loss) and got.epsilon == math.inf

    ref = _tiny_model()
    ref.load_state_dict(glob, strict=False)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    codes = np.unique(data.frame["patient_id"], return_inverse=True)[1]
    counts = np.bincount(codes)
    sampler = torch.Generator().manual_seed(derive_seed(3, 2, 0))
    nonempty = 0
    for idx in poisson_patient_batches(codes, q, steps, sampler):
        opt.zero_grad()
        if len(idx):
            nonempty += 1
            per_image = per_example_bce()(ref.head(data.x[idx]), data.y[idx])
            (per_image / torch.as_tensor(counts[codes[idx]], dtype=torch.float32)).sum().div(q * len(counts)).backward()
        else:
            for p in params:
                p.grad = torch.zeros_like(p)
        opt.step()
    assert nonempty >= 2
    diffs = {k: float((got.state[k] - v).abs().max()) for k, v in get_state(ref, got.state).items()}
    assert max(diffs.values()) < 2e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def test_dp_sgd_steps_per_round_and_sampling_rate():
    assert steps_per_round(209, 32, 1) == (32 / 209, 7)
    assert steps_per_round(10, 32, 2) == (1.0, 2)
    codes = np.repeat(np.arange(50), 3)
    sizes = [len(i) for i in poisson_patient_batches(codes, 0.2, 400, torch.Generator().manual_seed(0))]
    assert np.mean(sizes) == pytest.approx(0.2 * 150, rel=0.05)
    assert all(s % 3 == 0 for s in sizes)                          # whole patients, never part of one


# ---------------------------------------------------------------------- what travels
@pytest.mark.parametrize("dp", ["example", "client"])
def test_with_dp_no_batchnorm_statistic_travels(dp):
    cfg = Config(**TINY, dp=dp, dp_noise_multiplier=1.0)
    model = model_for(cfg, torch.device("cpu"))
    keys = exchanged_keys(model)
    assert not bn_keys(model)                                     # no BatchNorm left in layer4
    params = dict(model.named_parameters())
    assert all(k in params for k in keys)                          # every exchanged entry is a parameter
    assert not [k for k in keys if "running_" in k or "num_batches" in k]
    assert isinstance(model.layer4[0].bn1[0], nn.GroupNorm) and isinstance(model.layer4[0].downsample[1][0], nn.GroupNorm)
    plain = model_for(Config(**TINY), torch.device("cpu"))
    assert any("running_var" in k for k in exchanged_keys(plain))
    assert len(keys) == len([k for k in exchanged_keys(plain) if "running_" not in k and "num_batches" not in k])


def test_the_client_clips_what_it_sends_under_client_level_dp():
    data = _Images()
    model = _tiny_model()
    glob = get_state(model, exchanged_keys(model))
    client = Client(0, data, model, batch_size=4, lr=1e-4, clip_update=0.01)
    u = client.fit(glob, round_num=1)
    assert float(torch.linalg.vector_norm(flat_delta(u.state, glob, list(glob)))) == pytest.approx(0.01, rel=1e-4)
    assert math.isnan(u.train_loss)                                # the loss is not sent


# ---------------------------------------------------------------------- Config
@pytest.mark.parametrize("fields, message", [
    (dict(dp="example"), "exactly one of"),
    (dict(dp="example", dp_noise_multiplier=1.0, dp_target_epsilon=3.0), "exactly one of"),
    (dict(dp="patient", dp_noise_multiplier=1.0), "dp must be None"),
    (dict(dp=None, dp_noise_multiplier=1.0), "dp is None"),
    (dict(dp="client", dp_noise_multiplier=-1.0), "dp_noise_multiplier"),
    (dict(dp="client", dp_target_epsilon=0.0), "dp_target_epsilon"),
    (dict(dp="client", dp_noise_multiplier=1.0, dp_clip_norm=math.inf), "dp_clip_norm=inf"),
    (dict(dp="client", dp_noise_multiplier=1.0, dp_clip_norm=0.0), "dp_clip_norm must be > 0"),
    (dict(dp="client", dp_noise_multiplier=1.0, dp_delta=1.0), "dp_delta"),
    (dict(dp="client", dp_noise_multiplier=1.0, pos_weight=True), "pos_weight=True with dp"),
    (dict(dp="example", dp_noise_multiplier=1.0, local_keys="bn"), "local_keys='bn' with dp"),
    (dict(dp="client", dp_noise_multiplier=1.0, strategy="median"), "not a sum of updates"),
    (dict(dp="client", dp_noise_multiplier=1.0, strategy="scaffold", optimizer="sgd", momentum=0.0),
     "control variates"),
    (dict(dp="example", dp_noise_multiplier=1.0, amp="fp16"), "amp='fp16' with dp='example'"),
])
def test_config_refuses_what_breaks_the_guarantee_by_name(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Config(**fields)


def test_config_takes_the_dp_combinations_that_keep_it():
    Config(dp="example", dp_noise_multiplier=1.0, strategy="median")   # DP-SGD's outputs: post-processing
    Config(dp="client", dp_noise_multiplier=0.0, dp_clip_norm=math.inf)   # the reference without privacy
    Config(dp="client", dp_target_epsilon=8.0, strategy="fedadam", fraction_fit=0.2)


# ---------------------------------------------------------------------- runs
def _epsilons(h, client="global"):
    rows = h[(h.split == "privacy") & (h.metric == "epsilon") & (h.client == client)]
    return dict(zip(rows["round"], rows["value"]))


def test_client_level_run_reports_epsilon_per_round_and_in_run_info(tiny_splits, tmp_path):
    cfg = Config(**{**TINY, "num_rounds": 3}, dp="client", dp_noise_multiplier=1e-3, fraction_fit=0.5)
    res = run_federated(cfg, tiny_splits, tmp_path / "run")
    eps = _epsilons(res.history)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["privacy"]
    assert list(eps) == [1, 2, 3] and eps[1] < eps[2] < eps[3]
    assert eps[3] == pytest.approx(epsilon(1e-3, 0.5, 3, 1e-5)) == pytest.approx(info["final_epsilon"])
    assert info["delta"] == 1e-5 and info["accountant"].startswith("RDP (opacus")
    assert "not meaningful" in info["judged"]                       # 2 clients: an enormous epsilon, said so
    h = res.history
    assert not len(h[h.metric == "train_loss"])                      # no client loss leaves a client
    model = fedxray.load_model(tmp_path / "run" / "final_model.pt")   # a DP model loads back
    assert not bn_keys(model)


def test_target_epsilon_is_met_by_each_client_under_dp_sgd(tiny_splits, tmp_path):
    cfg = Config(**TINY, dp="example", dp_target_epsilon=4.0)
    res = run_federated(cfg, tiny_splits, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["privacy"]
    assert info["unit"] == "patient"
    for k in range(2):
        eps = _epsilons(res.history, str(k))
        assert list(eps) == [1, 2] and eps[1] < eps[2]
        assert 3.95 <= eps[2] <= 4.0                                 # the target, from below (0.01 search)
        assert eps[2] == pytest.approx(info["final_epsilon"][k])


def test_dp_sgd_run_resumes_with_each_clients_accountant(tiny_splits, tmp_path):
    cfg = Config(**{**TINY, "num_rounds": 3}, dp="example", dp_noise_multiplier=1.0, fraction_fit=0.5)
    assert_resume_equals_uninterrupted(cfg, tiny_splits, tmp_path)   # epsilon rows included
    h = pd.read_csv(tmp_path / "resumed" / "history.csv")
    assert len(h[h.split == "privacy"]) == 3                          # one trained client a round


def test_parts_prepared_without_dp_are_refused_for_a_dp_config(tiny_splits):
    from fedxray.parts import prepare, reuse
    parts = prepare(Config(**TINY), tiny_splits)
    with pytest.raises(ValueError, match="'dp'"):
        reuse(parts, Config(**TINY, dp="client", dp_noise_multiplier=1.0))


def test_private_norm_normalises_each_image_alone_from_the_batchnorm_affine():
    torch.manual_seed(0)
    model = build_model(14, None)
    with torch.no_grad():
        model.layer4[1].bn2.weight.uniform_(0.5, 1.5)
    gamma = model.layer4[1].bn2.weight.clone()
    private_norm(model)
    assert torch.equal(model.layer4[1].bn2[0].weight.detach(), gamma)   # starts from the BatchNorm's affine
    model.train()                                                     # training mode: BatchNorm would mix the batch
    x = torch.randn(5, 256, 4, 4)
    alone = model.head(x[:1])
    together = model.head(x)[:1]
    assert torch.allclose(alone, together, atol=1e-5)               # an image's output ignores the others
    assert not list(model.layer4.buffers())                           # no statistics to leak


def test_privacy_table_takes_the_federations_or_the_largest_clients_epsilon():
    from fedxray import history as hist
    from fedxray.plots import privacy_table

    def run(eps_rows):
        rows = [hist.row(2, "test", hist.GLOBAL, f"auroc_{n}", 0.7) for n in fedxray.LABELS]
        rows += [hist.row(2, "test", hist.GLOBAL, "mean_auroc", 0.7)]
        return hist.frame(rows + [hist.row(r, "privacy", c, "epsilon", e) for r, c, e in eps_rows])
    table = privacy_table({
        "client": run([(1, hist.GLOBAL, 3.0), (2, hist.GLOBAL, 5.0)]),
        "example": run([(1, "0", 1.0), (2, "0", 2.0), (1, "1", 4.0)]),   # client 1 not sampled in round 2
        "none": run([]),
    })
    assert table.loc["client", "epsilon"] == 5.0 == table.loc["client", "epsilon_min_client"]
    assert (table.loc["example", "epsilon"], table.loc["example", "epsilon_min_client"]) == (4.0, 2.0)
    assert np.isnan(table.loc["none", "epsilon"])
    assert table["test_mean_auroc"].tolist() == pytest.approx([0.7] * 3)
