import copy
import io
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedxray.aggregation import coordinate_median, fedavg, trimmed_mean
from fedxray.client import ClientUpdate
from fedxray.objectives import Corrected, Objective, Proximal
from fedxray.strategies import STRATEGIES, Strategy, make_strategy

# A layer4 + fc in miniature: two parameters, a BatchNorm buffer and its integer batch count.
SHAPES = {"conv.weight": (4, 3), "fc.bias": (5,), "bn.running_var": (4,), "bn.num_batches_tracked": ()}
BUFFERS = ("bn.running_var", "bn.num_batches_tracked")
PARAMS = ("conv.weight", "fc.bias")
COUNTS = [5, 17, 2, 9]
SERVER_OPTIMIZERS = {"fedavgm": {}, "fedadam": {}, "fedyogi": {}, "fedadagrad": {},
                     "scaffold": {"server_learning_rate": 0.5}}


def random_state(g: torch.Generator, dtype=torch.float32, scale: float = 1.0) -> dict[str, torch.Tensor]:
    state = {k: (scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for k, s in SHAPES.items()}
    state["bn.running_var"] = state["bn.running_var"].abs() + 0.5
    state["bn.num_batches_tracked"] = torch.randint(0, 50, (), generator=g)
    return state


def updates_for(strategy: Strategy, states, counts=COUNTS) -> list[ClientUpdate]:
    """Client updates from copies of states; SCAFFOLD's carry a new control variate per parameter
    (any float values do: here a function of the state, so each round's differ)."""
    names = strategy.parameter_names(states[0]) if strategy.name == "scaffold" else []
    return [ClientUpdate(copies(s), n, 0.5, client_id=k, extra={name: 0.5 * s[name] - 0.1 for name in names})
            for k, (s, n) in enumerate(zip(states, counts))]


def rounds_of_states(num_rounds: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return random_state(g, dtype), [[random_state(g, dtype) for _ in COUNTS] for _ in range(num_rounds)]


def copies(state):
    return {k: v.clone() for k, v in state.items()}


def build(name: str, **hyperparameters) -> Strategy:
    return make_strategy(name, buffers=BUFFERS, num_clients=len(COUNTS), **hyperparameters)


# ---------------------------------------------------------------------- every strategy
def test_fedavg_strategy_is_fedavg_bitwise():
    g0, (states,) = rounds_of_states(1)
    expected = fedavg(states, COUNTS)
    for name in ("fedavg", "fedprox"):
        strategy = build(name)
        out = strategy.aggregate(g0, updates_for(strategy, states), 1)
        assert list(out) == list(SHAPES)
        assert all(torch.equal(out[k], expected[k]) and out[k].dtype == expected[k].dtype for k in SHAPES), name


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_keeps_keys_dtypes_shapes_and_leaves_inputs_alone(name):
    strategy = build(name)
    g0, rounds = rounds_of_states(2)
    state = g0
    for r, states in enumerate(rounds, start=1):
        updates = updates_for(strategy, states)
        before_state, before_updates = copies(state), [(copies(u.state), copies(u.extra)) for u in updates]
        new = strategy.aggregate(state, updates, r)
        assert list(new) == list(state)
        for k, v in new.items():
            assert v.dtype == state[k].dtype and v.shape == state[k].shape and v.device.type == "cpu", (name, k)
            assert torch.isfinite(v.double()).all() and v is not state[k]
        assert all(torch.equal(state[k], before_state[k]) for k in state)
        for u, (s, e) in zip(updates, before_updates):
            assert all(torch.equal(u.state[k], s[k]) for k in s) and all(torch.equal(u.extra[k], e[k]) for k in e)
        state = new


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_refuses_an_update_with_other_keys_naming_the_client(name):
    strategy = build(name)
    g0, (states,) = rounds_of_states(1)
    updates = updates_for(strategy, states)
    del updates[2].state["fc.bias"]
    with pytest.raises(ValueError, match=r"client 2 sent keys .*missing \['fc.bias'\]"):
        strategy.aggregate(g0, updates, 1)
    updates = updates_for(strategy, states)
    updates[3].state["conv.weight"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"client 3's 'conv.weight' has shape \(3, 4\)"):
        strategy.aggregate(g0, updates, 1)
    updates = updates_for(strategy, states)
    updates[1].state["fc.bias"][0] = float("nan")
    with pytest.raises(ValueError, match=r"client 1's 'fc.bias' has 1 non-finite"):
        strategy.aggregate(g0, updates, 1)


# ---------------------------------------------------------------------- FedAvgM
def test_fedavgm_without_momentum_is_fedavg():
    # Flower's FedAvgM switches its server optimizer off at momentum 0 and learning rate 1, so it is
    # fedavg bitwise (old - 1 * (old - mean) would differ from the mean in the last bit).
    strategy = build("fedavgm", server_momentum=0.0, server_learning_rate=1.0)
    g0, rounds = rounds_of_states(2)
    state = g0
    for r, states in enumerate(rounds, start=1):
        state = strategy.aggregate(state, updates_for(strategy, states), r)
        expected = fedavg(states, COUNTS)
        assert all(torch.equal(state[k], expected[k]) for k in SHAPES)


def test_fedavgm_momentum_against_numpy_over_two_rounds():
    lr, momentum = 0.7, 0.9
    strategy = build("fedavgm", server_learning_rate=lr, server_momentum=momentum)
    g0, rounds = rounds_of_states(2, dtype=torch.float64)
    state = g0
    x = {k: g0[k].numpy() for k in PARAMS}
    mv = {}
    for r, states in enumerate(rounds, start=1):
        state = strategy.aggregate(state, updates_for(strategy, states), r)
        for k in PARAMS:
            mean = np.average(np.stack([s[k].numpy() for s in states]), axis=0, weights=COUNTS)
            pseudo_gradient = x[k] - mean
            mv[k] = pseudo_gradient if r == 1 else momentum * mv[k] + pseudo_gradient
            x[k] = x[k] - lr * mv[k]
            np.testing.assert_allclose(state[k].numpy(), x[k], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- against Flower 1.42
def _flower_reply(state: dict[str, torch.Tensor], n: int, k: int):
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
    parent = Message(RecordDict(), metadata=Metadata(
        run_id=1, message_id=f"train-{k}", src_node_id=1, dst_node_id=10 + k, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train"))
    content = RecordDict({"arrays": ArrayRecord({key: Array(v.numpy()) for key, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": n})})
    return Message(content, reply_to=parent)


@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-5, 1e-7), (torch.float64, 1e-12, 1e-14)])
@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_optimizers_agree_with_flower_over_three_rounds(name, dtype, rtol, atol):
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp import strategy as flower_strategies

    flower_class = {"fedadam": "FedAdam", "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad", "fedavgm": "FedAvgM"}
    hyperparameters = {"fedavgm": {"server_learning_rate": 0.8, "server_momentum": 0.9},   # not the defaults:
                       "fedadam": {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3},
                       "fedyogi": {"eta": 0.02, "beta_1": 0.85, "beta_2": 0.9, "tau": 1e-3},
                       "fedadagrad": {"eta": 0.05, "tau": 1e-2}}[name]
    ours = make_strategy(name, **hyperparameters)                  # buffers=(): every float entry, as Flower
    flower = getattr(flower_strategies, flower_class[name])(**hyperparameters)
    g = torch.Generator().manual_seed(1)
    floats = {"conv.weight": (4, 3), "fc.bias": (5,), "fc.weight": (5, 4)}
    state = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in floats.items()}
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    for r in (1, 2, 3):
        states = [{k: (v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype)) for k, v in
                   state.items()} for _ in COUNTS]
        # what Flower's configure_train keeps of the arrays it sends (FedOpt: every round; FedAvgM: once)
        if name == "fedavgm":
            flower.current_arrays = flower.current_arrays or arrays
        else:
            flower.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        arrays, _ = flower.aggregate_train(r, [_flower_reply(s, n, k) for k, (s, n) in enumerate(zip(states, COUNTS))])
        state = ours.aggregate(state, updates_for(ours, states), r)
        for k, v in state.items():
            theirs = arrays[k].numpy()
            # Flower's FedAdam returns float32 arrays as float64 (its eta_norm is a numpy float64,
            # which NumPy 2 promotes with); ours keep each entry's dtype.
            assert theirs.dtype == (np.float64 if name == "fedadam" else v.numpy().dtype), k
            np.testing.assert_allclose(v.numpy(), theirs, rtol=rtol, atol=atol, err_msg=f"round {r}, {k}")


def test_defaults_are_flowers_but_where_flowers_are_fedavg_or_measured_to_wreck_the_demo():
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.serverapp import strategy as fs
    for name, flower in [("fedyogi", fs.FedYogi()), ("trimmed_mean", fs.FedTrimmedAvg())]:
        assert STRATEGIES[name].defaults == {k: getattr(flower, k) for k in STRATEGIES[name].defaults}, name
    # The adaptive optimizers keep Flower's betas and tau; eta is 0.01 (Flower's 0.1 for FedAdam and
    # FedAdagrad wrecks layer4 on the demo, see their docstrings).
    for name, flower in [("fedadam", fs.FedAdam()), ("fedadagrad", fs.FedAdagrad())]:
        assert flower.eta == 0.1 and STRATEGIES[name].defaults["eta"] == 0.01
        assert {k: v for k, v in STRATEGIES[name].defaults.items() if k != "eta"} == \
            {k: getattr(flower, k) for k in STRATEGIES[name].defaults if k != "eta"}, name
    # Flower's FedProx (mu 0) and FedAvgM (momentum 0) defaults are FedAvg itself; ours are not.
    assert fs.FedProx().proximal_mu == 0.0 and STRATEGIES["fedprox"].defaults == {"proximal_mu": 0.01}
    assert fs.FedAvgM().server_momentum == 0.0 and STRATEGIES["fedavgm"].defaults == \
        {"server_learning_rate": 0.1, "server_momentum": 0.9}   # effective step 0.1 / (1 - 0.9) = 1


# ---------------------------------------------------------------------- buffers
@pytest.mark.parametrize("name", list(SERVER_OPTIMIZERS))
def test_server_optimizers_average_buffers_and_step_parameters(name):
    strategy = build(name, **SERVER_OPTIMIZERS[name])
    naive = make_strategy(name, num_clients=len(COUNTS), **SERVER_OPTIMIZERS[name])   # buffers=()
    g0, rounds = rounds_of_states(2)
    state = naive_state = g0
    for r, states in enumerate(rounds, start=1):
        expected = fedavg(states, COUNTS)
        state = strategy.aggregate(state, updates_for(strategy, states), r)
        naive_state = naive.aggregate(naive_state, updates_for(naive, states), r)
        for k in BUFFERS:
            assert state[k].dtype == expected[k].dtype and torch.equal(state[k], expected[k]), k
        # By round 2 the optimizer moved the parameters (FedAvgM's first step at learning rate 1 is
        # FedAvg's) and, without buffers named, the float statistic too; the integer count never moves.
        moved = (*PARAMS, "bn.running_var")
        stepped = zip([state, state, naive_state], moved)
        assert r == 1 or all((s[k] - expected[k]).abs().max() > 1e-3 for s, k in stepped)
        assert torch.equal(naive_state["bn.num_batches_tracked"], expected["bn.num_batches_tracked"])


# ---------------------------------------------------------------------- robust aggregation
def _float64_states(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 4, generator=g, dtype=torch.float64), "s": torch.randn((), generator=g,
             dtype=torch.float64)} for _ in range(n)]


@pytest.mark.parametrize("n", [1, 4, 5])
def test_coordinate_median_is_np_median(n):
    states = _float64_states(n)
    out = coordinate_median(states)
    for k in ("w", "s"):
        expected = np.median(np.stack([s[k].numpy() for s in states]), axis=0)   # even n: mean of the middle two
        assert out[k].dtype == torch.float64 and np.array_equal(out[k].numpy(), expected), k
    f32 = coordinate_median([{k: v.float() for k, v in s.items()} for s in states])
    expected = np.median(np.stack([s["w"].float().double().numpy() for s in states]), axis=0).astype(np.float32)
    assert f32["w"].dtype == torch.float32 and np.array_equal(f32["w"].numpy(), expected)


@pytest.mark.parametrize("n,beta", [(5, 0.2), (10, 0.25), (4, 0.1), (7, 0.0), (9, 0.49)])
def test_trimmed_mean_is_scipy_trim_mean(n, beta):
    states = _float64_states(n)
    out = trimmed_mean(states, beta)
    cut = int(beta * n)
    for k in ("w", "s"):
        stacked = np.sort(np.stack([s[k].numpy() for s in states]), axis=0)
        np.testing.assert_allclose(out[k].numpy(), stacked[cut:n - cut].mean(axis=0), rtol=1e-14, atol=1e-15)


def test_trimmed_mean_is_flowers_trim_mean_bitwise():
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    states = _float64_states(7)
    out = trimmed_mean(states, 0.3)
    assert np.array_equal(out["w"].numpy(), trim_mean(np.stack([s["w"].numpy() for s in states]), 0.3))


def test_robust_aggregators_round_integer_buffers_half_to_even():
    states = [{"n": torch.tensor(v)} for v in (2, 3)]                # median and mean: 2.5 -> 2
    assert coordinate_median(states)["n"].item() == 2 and trimmed_mean(states, 0.0)["n"].item() == 2
    states = [{"n": torch.tensor(v)} for v in (3, 4)]                # 3.5 -> 4
    assert coordinate_median(states)["n"].dtype == torch.int64 and coordinate_median(states)["n"].item() == 4


@pytest.mark.parametrize("beta", [0.5, -0.1, float("nan"), True])
def test_trimmed_mean_refuses_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(_float64_states(3), beta)


def test_robust_aggregators_refuse_what_fedavg_refuses():
    states = _float64_states(3)
    states[1]["w"][0, 0] = float("inf")
    for aggregate in (coordinate_median, lambda s: trimmed_mean(s, 0.2)):
        with pytest.raises(ValueError, match="client 1: 'w' has 1 non-finite"):
            aggregate(states)
        with pytest.raises(ValueError, match="at least one client state"):
            aggregate([])


def test_poisoned_client_ruins_fedavg_but_not_median_or_trimmed_mean():
    g = torch.Generator().manual_seed(0)
    common = {"w": torch.randn(50, generator=g), "running_var": torch.rand(50, generator=g) + 0.5}
    honest = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in common.items()} for _ in range(4)]
    poisoned = {k: 1e6 * v for k, v in honest[0].items()}
    states = honest + [poisoned]
    honest_mean = {k: torch.stack([s[k] for s in honest]).mean(0) for k in common}
    g0 = {k: torch.zeros_like(v) for k, v in common.items()}

    def distance(state):
        return max(float((state[k] - honest_mean[k]).abs().max()) for k in common)

    results = {name: make_strategy(name).aggregate(g0, [ClientUpdate(s, 10, 0.5, k) for k, s in enumerate(states)], 1)
               for name in ("fedavg", "median", "trimmed_mean")}
    assert distance(results["fedavg"]) > 1e4
    assert distance(results["median"]) < 0.05
    assert distance(results["trimmed_mean"]) < 0.05


# ---------------------------------------------------------------------- SCAFFOLD
D = 3
SIZES = [20, 60, 10, 40]     # unequal: the example-weighted optimum differs from the unweighted one


def regression_clients(seed: int = 0):
    """Four linear-regression clients with different inputs (so different Hessians) and optima."""
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i, n in enumerate(SIZES):
        x = torch.randn(n, D, generator=g, dtype=torch.float64) * (0.5 + i) + i
        y = x @ (2 * torch.randn(D, generator=g, dtype=torch.float64)) + (i - 1.5)
        clients.append((x, y + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)))
    return clients


def least_squares(clients, weighted: bool = True) -> torch.Tensor:
    """argmin of the example-weighted mean of the client MSEs (or of their plain mean): (weight, bias)."""
    rows = [(torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1), y) for x, y in clients]
    scale = [1.0 if weighted else len(y) ** -0.5 for _, y in rows]
    a = torch.cat([r * s for (r, _), s in zip(rows, scale)])
    b = torch.cat([y * s for (_, y), s in zip(rows, scale)])
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)


def local_sgd(objective: Objective, global_state, payload, x, y, steps: int, lr: float):
    """K plain full-batch SGD steps on MSE + objective.penalty, as Client.fit trains (float32)."""
    model = nn.Linear(D, 1)
    model.load_state_dict(global_state)
    params = dict(model.named_parameters())
    anchor = {k: v.detach().clone() for k, v in global_state.items()}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.mse_loss(model(x).squeeze(1), y)
        penalty = objective.penalty(params, anchor, payload)
        opt.zero_grad()
        (loss if penalty is None else loss + penalty).backward()
        opt.step()
    with torch.no_grad():
        extra = objective.reply(params, anchor, payload, steps, lr)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, extra


def federated_regression(name: str, rounds: int, per_round=None, steps: int = 10, lr: float = 0.02):
    clients = regression_clients()
    strategy = make_strategy(name, num_clients=len(clients))
    state = {"weight": torch.zeros(1, D), "bias": torch.zeros(1)}
    rng = np.random.default_rng(0)
    for r in range(1, rounds + 1):
        chosen = range(len(clients)) if per_round is None else sorted(rng.choice(len(clients), per_round, False))
        updates = []
        for k in chosen:
            x, y = clients[k]
            new, extra = local_sgd(strategy.objective, state, strategy.payload(k, state), x.float(), y.float(),
                                   steps, lr)
            updates.append(ClientUpdate(new, SIZES[k], 0.0, client_id=int(k), extra=extra))
        state = strategy.aggregate(state, updates, r)
    return torch.cat([state["weight"].double().flatten(), state["bias"].double()])


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts():
    clients = regression_clients()
    optimum, unweighted = least_squares(clients), least_squares(clients, weighted=False)
    assert (optimum - unweighted).norm() > 1.0     # so the weighting of c is pinned down below
    scaffold = federated_regression("scaffold", rounds=80)
    fedavg_result = federated_regression("fedavg", rounds=80)
    assert (scaffold - optimum).norm() < 1e-4
    assert (fedavg_result - optimum).norm() > 0.5   # client drift: K local steps on different objectives


def test_scaffold_with_half_the_clients_per_round_still_converges():
    optimum = least_squares(regression_clients())
    assert (federated_regression("scaffold", rounds=150, per_round=2) - optimum).norm() < 1e-4


def test_scaffold_payload_is_c_minus_c_k_with_c_weighted_by_examples():
    strategy = make_strategy("scaffold", buffers=BUFFERS, num_clients=4)
    g0, (states,) = rounds_of_states(1)
    assert all(torch.equal(v, torch.zeros(SHAPES[k])) for k, v in strategy.payload(2, g0).items())
    assert set(strategy.payload(2, g0)) == set(PARAMS)
    # Clients 0 (10 examples) and 1 (30) report; 2 and 3, not heard from, count with the mean size 20.
    updates = updates_for(strategy, states[:2], counts=[10, 30])
    strategy.aggregate(g0, updates, 1)
    for k in PARAMS:
        c = (10 * updates[0].extra[k].double() + 30 * updates[1].extra[k].double()) / (4 * 20)
        for client, c_k in [(0, updates[0].extra[k]), (1, updates[1].extra[k]), (3, torch.zeros(SHAPES[k]))]:
            torch.testing.assert_close(strategy.payload(client, g0)[k], (c - c_k.double()).float())
    # with equal sizes, the paper's plain mean over all clients
    strategy = make_strategy("scaffold", buffers=BUFFERS, num_clients=4)
    updates = updates_for(strategy, states, counts=[7] * 4)
    strategy.aggregate(g0, updates, 1)
    c = torch.stack([u.extra["fc.bias"] for u in updates]).double().mean(0)
    torch.testing.assert_close(strategy.payload(1, g0)["fc.bias"], (c - updates[1].extra["fc.bias"]).float())


def test_scaffold_server_step():
    g0, (states,) = rounds_of_states(1)
    expected = fedavg(states, COUNTS)
    strategy = build("scaffold")
    out = strategy.aggregate(g0, updates_for(strategy, states), 1)
    assert all(torch.equal(out[k], expected[k]) for k in SHAPES)       # server_learning_rate 1: fedavg exactly
    strategy = build("scaffold", server_learning_rate=0.5)
    out = strategy.aggregate(g0, updates_for(strategy, states), 1)
    for k in PARAMS:
        torch.testing.assert_close(out[k], (g0[k].double() + 0.5 * (expected[k].double() - g0[k].double())).float())
    assert all(torch.equal(out[k], expected[k]) for k in BUFFERS)


def test_scaffold_refuses_updates_it_cannot_attribute_or_use():
    strategy = build("scaffold")
    g0, (states,) = rounds_of_states(1)

    def refused(change, match):
        updates = updates_for(strategy, states)
        change(updates)
        before = strategy.state_dict()
        with pytest.raises(ValueError, match=match):
            strategy.aggregate(g0, updates, 1)
        assert strategy.state_dict()["control_variates"] is None and before["control_variates"] is None

    def set_id(i, value):
        def change(updates):
            u = updates[i]
            updates[i] = ClientUpdate(u.state, u.num_examples, u.train_loss, value, u.extra)
        return change

    refused(set_id(1, None), r"client None: a client_id in \[0, 4\)")
    refused(set_id(1, 4), r"client 4: a client_id in \[0, 4\)")
    refused(set_id(1, 0), "client 0 sent two updates")
    refused(lambda u: u[2].extra.pop("fc.bias"), "client 2 sent no control variate for exactly")
    refused(lambda u: u[2].extra.update({"fc.bias": torch.zeros(4)}), r"client 2's control variate 'fc.bias' has shape")
    refused(lambda u: u[3].extra["conv.weight"].fill_(float("nan")),
            "client 3's control variate 'conv.weight' has 12 non-finite")
    refused(lambda u: u.__setitem__(3, ClientUpdate(u[3].state, -1, 0.5, 3, u[3].extra)), "client 3 is negative")
    with pytest.raises(ValueError, match="client 7"):
        strategy.payload(7, g0)


def test_objectives_of_the_strategies():
    assert type(build("fedavg").objective) is Objective and type(build("fedadam").objective) is Objective
    prox = build("fedprox")
    assert isinstance(prox.objective, Proximal) and prox.objective.proximal_mu == 0.01
    assert build("fedprox", proximal_mu=0.0).objective.penalty({}, {}, {}) is None
    assert isinstance(build("scaffold").objective, Corrected)


# ---------------------------------------------------------------------- construction
def test_registry_order_and_defaults():
    assert list(STRATEGIES) == ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median",
                                "trimmed_mean", "scaffold"]
    for name, cls in STRATEGIES.items():
        assert cls.name == name and cls.paper and cls.__doc__
        strategy = make_strategy(name, num_clients=3, **{k: None for k in cls.defaults})
        assert strategy.hyperparameters == cls.defaults
    assert make_strategy("fedadam", eta=0.5, tau=None).hyperparameters == {"eta": 0.5, "beta_1": 0.9,
                                                                          "beta_2": 0.99, "tau": 1e-3}


def test_make_strategy_refuses_unknown_names_and_hyperparameters():
    with pytest.raises(ValueError, match=r"unknown strategy 'fedsgd': choose one of \('fedavg', 'fedprox'"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match=r"strategy 'fedavg' takes no hyperparameter \['eta'\]; its .*none"):
        make_strategy("fedavg", eta=0.1)
    with pytest.raises(ValueError, match=r"'fedadagrad' takes no hyperparameter \['beta_1'\]; .*\['eta', 'tau'\]"):
        make_strategy("fedadagrad", beta_1=0.9)
    with pytest.raises(ValueError, match="scaffold' needs num_clients"):
        make_strategy("scaffold")


@pytest.mark.parametrize("name,key,value", [
    ("fedprox", "proximal_mu", -0.1), ("fedavgm", "server_momentum", 1.0), ("fedavgm", "server_momentum", -0.5),
    ("fedavgm", "server_learning_rate", 0.0), ("fedadam", "eta", -1.0), ("fedadam", "tau", 0.0),
    ("fedadam", "beta_1", 1.0), ("fedyogi", "beta_2", 1.0), ("fedyogi", "eta", float("nan")),
    ("fedadagrad", "tau", float("inf")), ("trimmed_mean", "beta", 0.5), ("scaffold", "server_learning_rate", -1),
    ("fedadam", "eta", True), ("fedadam", "eta", "0.1")])
def test_make_strategy_refuses_out_of_range_values(name, key, value):
    with pytest.raises(ValueError, match=f"strategy '{name}': {key} must"):
        make_strategy(name, num_clients=2, **{key: value})


def test_config_problems():
    for name, cls in STRATEGIES.items():
        if name != "scaffold":
            assert cls.config_problems(SimpleNamespace(optimizer="adam", momentum=0.9)) == []
    scaffold = STRATEGIES["scaffold"]
    assert scaffold.config_problems(SimpleNamespace(optimizer="sgd", momentum=0.0)) == []
    for optimizer, momentum in [("adam", 0.0), ("sgd", 0.9)]:
        (problem,) = scaffold.config_problems(SimpleNamespace(optimizer=optimizer, momentum=momentum))
        assert "set optimizer='sgd' and momentum=0" in problem


# ---------------------------------------------------------------------- checkpoints
def _through_file(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_state_dict_round_trip_resumes_bitwise(name):
    g0, rounds = rounds_of_states(3)
    strategy = build(name, **SERVER_OPTIMIZERS.get(name, {}))
    state = g0
    for r, states in enumerate(rounds[:2], start=1):
        state = strategy.aggregate(state, updates_for(strategy, states), r)
    saved = strategy.state_dict()
    snapshot = copy.deepcopy(saved)
    uninterrupted = strategy.aggregate(state, updates_for(strategy, rounds[2]), 3)
    assert _equal(saved, snapshot)     # a copy, not a live reference: the engine rolls back to it

    resumed = build(name, **SERVER_OPTIMIZERS.get(name, {}))
    resumed.load_state_dict(_through_file(saved), state)
    again = resumed.aggregate(state, updates_for(resumed, rounds[2]), 3)
    assert all(torch.equal(again[k], uninterrupted[k]) for k in SHAPES)
    assert _equal(resumed.state_dict(), strategy.state_dict())
    for k, v in strategy.payload(2, again).items():
        assert torch.equal(resumed.payload(2, again)[k], v)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold"])
def test_load_state_dict_refuses_a_corrupt_state(name):
    g0, rounds = rounds_of_states(1)
    strategy = build(name, **SERVER_OPTIMIZERS[name])
    strategy.aggregate(g0, updates_for(strategy, rounds[0]), 1)
    good = strategy.state_dict()
    slot = strategy.slots[0]

    def corrupt(change):
        state = {k: (copies(v) if isinstance(v, dict) else v) for k, v in good.items()}
        change(state)
        return state

    def nan(s):
        s[slot]["fc.bias"] = s[slot]["fc.bias"].clone()
        s[slot]["fc.bias"].view(-1)[0] = float("nan")

    cases = [
        (lambda s: s[slot].update({"fc.bias": s[slot]["fc.bias"][..., :2]}), r"\['fc.bias'\] has shape"),
        (nan, r"\['fc.bias'\] has 1 non-finite"),
        (lambda s: s[slot].pop("conv.weight"), "must map exactly the 2 parameter names"),
        (lambda s: s[slot].update({"bn.running_var": torch.ones(4)}), "must map exactly the 2 parameter names"),
        (lambda s: s[slot].update({"fc.bias": s[slot]["fc.bias"].half()}), "has dtype torch.float16"),
        (lambda s: s.pop(slot), "must have the entries"),
        (lambda s: s.update({"strategy": "fedavg"}), "strategy 'fedavg''s, not"),
    ] + ([(lambda s: s.update({"num_examples": None}), "both or neither")] if name == "scaffold" else [])
    fresh = build(name, **SERVER_OPTIMIZERS[name])
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(corrupt(change), g0)
        assert all(v is None for k, v in fresh.state_dict().items() if k != "strategy")   # nothing half-loaded
    fresh.load_state_dict(good, g0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict()[slot].values(), good[slot].values()))


def test_stateless_strategies_check_their_state_too():
    strategy = build("median")
    g0, _ = rounds_of_states(1)
    strategy.load_state_dict({"strategy": "median"}, g0)
    with pytest.raises(ValueError, match="must have the entries"):
        strategy.load_state_dict({"strategy": "median", "m": None}, g0)
    with pytest.raises(ValueError, match="'trimmed_mean''s, not 'median''s"):
        strategy.load_state_dict({"strategy": "trimmed_mean"}, g0)
