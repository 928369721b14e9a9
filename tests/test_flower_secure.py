"""Secure aggregation (SecAgg+) and differential privacy on Flower: the quantisation bound against
Flower's own quantiser, the run-config checks, DP's server and client sides in process, and a real
federation (SuperLink and three SuperNodes on 127.0.0.1) whose server is instrumented to keep every
message it receives."""
import json
import math
import time
import tomllib

import numpy as np
import pandas as pd
import pytest
import torch

import fedxray
from fedxray import Config, run_federated
from fedxray.saved_model import load_final
from fedxray.flower import APP_DIR, write_client_folders, write_nih_folder, write_run_config
from fedxray.flower import run_config_from_config
from fedxray.flower.runconfig import check_supported, fault_policy
from flower_audit import audit_app, largest_correlation
from test_flower import (DEADLINE_S, DIGEST, TINY, Federation, _message, connected,  # noqa: F401
                         need_flower_processes, processes)  # (processes: a fixture)

SECURE = {**TINY, "num_clients": 3, "num_rounds": 1, "select_round": "last"}


# ----------------------------------------------------------------------------- the bound
def test_quantization_bound_holds_for_flowers_own_quantiser():
    """Flower's quantise / sum / dequantise path (what secaggplus_mod and SecAggPlusWorkflow compute,
    without the masks, which cancel exactly modulo 2^32) stays within quantization_bound of the exact
    weighted mean, coordinate by coordinate, and the bound is not loose by orders of magnitude."""
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from fedxray.flower.secure import QUANTIZATION_RANGE as Q, quantization_bound
    rng = np.random.default_rng(0)
    np.random.seed(0)   # Flower's stochastic rounding draws from numpy's global generator
    c = 8.0
    counts = [37, 1000, 412]
    m = max(counts)
    updates = [rng.uniform(-c, c, size=200_000) for _ in counts]
    # client i: weight q_i / Q, scaled update quantised; the server sums, dequantises, divides
    q = [round(n / m * Q) for n in counts]
    summed = sum(quantize([u * (qi / Q)], c, Q)[0].astype(np.int64) for u, qi in zip(updates, q))
    mean = (dequantize([summed], c, Q)[0] - (len(counts) - 1) * c) * (Q / sum(q))
    exact = sum(n * u for n, u in zip(counts, updates)) / sum(counts)
    worst = np.abs(mean - exact).max()
    bound = quantization_bound(counts, m, c)
    assert worst < bound
    assert worst > bound / 20   # a bound of the right size, not a vacuous one
    # Under client-level DP every weight is 1: the mean times n is the sum, to within n * 2c / Q.
    assert quantization_bound([1, 1, 1], 1.0, 1.0) == pytest.approx(3 * 1.0 * 3 / (Q * 3))


def test_flower_refuses_what_secure_aggregation_or_dp_cannot_do():
    with pytest.raises(ValueError, match="median.*secagg"):
        Config(**SECURE, strategy="median", secagg=True)
    with pytest.raises(ValueError, match="scaffold.*secagg"):
        Config(**SECURE, strategy="scaffold", optimizer="sgd", momentum=0.0, secagg=True)
    one = Config(**{**SECURE, "num_clients": 2}, fraction_fit=0.5, secagg=True)
    with pytest.raises(ValueError, match="secagg with 1 client per round"):
        check_supported(one)
    with pytest.raises(ValueError, match="dp-delta"):
        check_supported(Config(**SECURE, dp="example", dp_noise_multiplier=1.0))
    check_supported(Config(**SECURE, dp="example", dp_noise_multiplier=1.0, dp_delta=1e-5))
    check_supported(Config(**SECURE, dp="client", dp_noise_multiplier=1.0, fraction_fit=0.3, secagg=True))
    # Poisson sampling: min-replies may be anything up to every client
    dp = Config(**SECURE, dp="client", dp_noise_multiplier=1.0, fraction_fit=0.3)
    assert fault_policy({"min-replies": 3}, dp).min_replies == 3
    app = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app["secagg"] is False


# ----------------------------------------------------------------------------- a real federation
def _final_state(out):
    return load_final(out / "final_model.pt")["state"]


@pytest.mark.slow
def test_one_federation_runs_plain_secure_and_private_runs_as_in_process(tiny_splits, tmp_path, processes):
    """A SuperLink and three SuperNodes on 127.0.0.1, three `flwr run`s one after the other:
    - FedProx, no SecAgg+: the run ends as fedxray.run_federated in process (weights,
      config, run info, history), and the instrumented server (tests/flower_audit.py: it keeps
      every array of fc.weight's size it receives) finds each site's trained state in what it
      received (|r| > 0.999): the instrument sees what it looks for;
    - FedAvg with SecAgg+ (example weights) and DP-FedAvg with SecAgg+ (unweighted, noise on the
      sum), one round each: the final weights equal the in-process run with exact sums to within
      quantization_bound per coordinate, and differ from it (the quantiser ran); the server never
      held an array correlated with any site's update or trained state (|r| < 0.1); the history
      counts the protocol's bytes, and under DP has the epsilon row and no training loss."""
    need_flower_processes()
    from test_flower import compare_with_in_process
    from fedxray.flower.secure import QUANTIZATION_RANGE, clipping_range, quantization_bound
    until = time.monotonic() + 3 * DEADLINE_S
    frames = fedxray.partition(tiny_splits["train"], 3, seed=0)
    sites = write_client_folders(frames, tmp_path / "sites")
    val_dir = write_nih_folder(tiny_splits["val"], tmp_path / "server" / "val")
    test_dir = write_nih_folder(tiny_splits["test"], tmp_path / "server" / "test")
    key, size = "fc.weight", 14 * 512
    runs = {
        "fedprox": Config(**SECURE, strategy="fedprox"),
        "secagg": Config(**SECURE, secagg=True),
        "secagg_dp": Config(**SECURE, secagg=True, dp="client", dp_noise_multiplier=0.5, dp_clip_norm=1.0),
    }
    try:
        federation = None
        for name, config in runs.items():
            audit = tmp_path / f"audit_{name}"
            audit.mkdir()
            app = audit_app(tmp_path / name, audit, key, size)
            if federation is None:
                federation = Federation(processes, tmp_path, sites, until, app_dir=app)
            federation.app_dir = app
            out = tmp_path / f"flower_{name}"
            overrides = write_run_config(tmp_path / f"run_config_{name}.toml", config, out, val_dir, test_dir)
            run = federation.run(overrides, f"flwr_run_{name}")
            sim = run_federated(config, tiny_splits, tmp_path / f"sim_{name}", client_frames=frames)
            final = out / "final_model.pt"
            federation.wait(final.exists, f"{final} is written", run, may_die=("flwr_run",))
            seen = largest_correlation(audit, range(3))
            if not config.secagg:
                compare_with_in_process(out, tmp_path / f"sim_{name}", sim.model, rounds=config.num_rounds)
                assert seen > 0.999, seen   # the server holds each site's trained state in the clear
                continue
            got, want = _final_state(out), _final_state(tmp_path / f"sim_{name}")
            assert set(got) == set(want)
            assert not any("running" in k or "num_batches" in k for k in got)   # GroupNorm: no statistics
            worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
            weights = [1, 1, 1] if config.dp else [len(f) for f in frames]
            bound = quantization_bound(weights, max(weights), clipping_range(config))
            if config.dp:   # the sum's error (< n 2c / Q), divided by the expected number of clients (3 x 1.0)
                bound = 2 * clipping_range(config) * 3 / QUANTIZATION_RANGE / 3
            print(f"{name}: max |SecAgg+ - exact| {worst:.3g}, bound {bound:.3g}; largest |r| at the server {seen:.3f}")
            assert worst <= bound + 1e-6, (name, worst, bound)   # (+ float32 storage of the states)
            assert worst > 0   # the quantiser did run: SecAgg+ is not the plain sum
            assert seen < 0.1, name
            h = pd.read_csv(out / "history.csv", dtype={"client": str})
            received = h.query("split == 'comm' and metric == 'bytes_received'")["value"]
            assert float(received.iloc[0]) > 3 * size * 4   # the protocol's messages, masked vectors included
            if config.dp:
                eps = h.query("split == 'privacy' and metric == 'epsilon'")["value"].tolist()
                assert len(eps) == 1 and math.isfinite(eps[0])
                assert not (h["metric"] == "train_loss").any()   # nothing the guarantee does not cover
                info = json.loads((out / "run_info.json").read_text())
                assert info["privacy"]["final_epsilon"] == pytest.approx(eps[0])
    except BaseException:
        print(processes.logs())
        raise


# ----------------------------------------------------------------------------- DP on Flower, in process
def _dp_strategy(counts, **config):
    """A FedXrayStrategy under client-level DP (GroupNorm-like state: parameters only) that sent
    zeros to clients 0..n-1 on nodes 10, 11, ..."""
    from fedxray.flower.strategy import FedXrayStrategy
    from fedxray.parts import strategy_for
    cfg = Config(**{**SECURE, "num_clients": len(counts)}, dp="client", **config)
    torch.manual_seed(0)
    sent = {"layer4.0.conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(14)}
    flower = connected(FedXrayStrategy(cfg, strategy_for(cfg, fedxray.build_model(14, None))), counts)
    flower.chosen = list(range(len(counts)))
    flower.sent = sent
    return flower


def test_flower_client_level_dp_is_the_in_process_mechanism_and_sends_no_loss():
    """Under dp='client' the Flower server's aggregate of the checked replies is exactly
    ClientLevelDP.aggregate of the same updates (same clip, same seeded noise, same denominator);
    a reply that carries a training loss is refused (the guarantee does not cover it); a round that
    samples nobody still adds its noise."""
    pytest.importorskip("opacus", reason="opacus not installed: pip install -e '.[privacy]'")
    from fedxray.client import ClientUpdate
    from fedxray.flower.records import to_state, train_reply
    from fedxray.flower.strategy import RoundFailed
    flower = _dp_strategy([5, 17, 2], dp_noise_multiplier=0.7, dp_clip_norm=1.0)
    g = torch.Generator().manual_seed(1)
    updates = [ClientUpdate({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in flower.sent.items()}, n, math.nan,
                            client_id=k) for k, n in enumerate([5, 17, 2])]
    replies = [_message(train_reply(u, k, DIGEST, dp="client"), "train", src=10 + k) for k, u in enumerate(updates)]
    assert all("train_loss" not in m.content["metrics"] for m in replies)
    arrays, metrics = flower.aggregate_train(1, replies[::-1])
    expected = flower.strategy.aggregate(flower.sent, updates, 1)
    for key, value in to_state(arrays).items():
        assert torch.equal(value, expected[key]), key
    assert "train_loss" not in metrics
    leaky = _message(train_reply(ClientUpdate(updates[0].state, 5, 0.3), 0, DIGEST), "train", src=10)   # a loss, under DP
    with pytest.raises(RoundFailed, match="no training loss leaves a client under DP"):
        flower.aggregate_train(1, [leaky] + replies[1:])
    flower.chosen = []                                                     # Poisson sampling drew nobody
    arrays, metrics = flower.aggregate_train(2, [])
    noise_only = to_state(arrays)
    for key, value in flower.strategy.aggregate(flower.sent, [], 2).items():
        assert torch.equal(noise_only[key], value)
    assert any(float(v.abs().max()) > 0 for v in noise_only.values())


def test_flower_checks_each_clients_epsilon_against_its_own_accounting():
    """Under dp='example' a reply carries the site's epsilon; the server computes it from the
    run's settings and the site's reported size, and refuses one that differs."""
    pytest.importorskip("opacus", reason="opacus not installed: pip install -e '.[privacy]'")
    from fedxray.client import ClientUpdate
    from fedxray.dpsgd import spec_for
    from fedxray.flower.records import MessageError, check_train_reply, train_reply
    cfg = Config(**SECURE, dp="example", dp_noise_multiplier=1.1, dp_delta=1e-5)
    want = spec_for(cfg, 40, 1e-5).epsilon_after(1)
    sent = {"fc.bias": torch.zeros(14)}
    kwargs = dict(client_id=0, node_id=10, num_examples=40, image_digest=DIGEST, sent=sent, max_steps=10, dp="example")
    good = train_reply(ClientUpdate({"fc.bias": torch.ones(14) * 0.01}, 40, math.nan, epsilon=want), 0, DIGEST, "example")
    assert check_train_reply(good, epsilon=want, **kwargs).epsilon == want
    bad = train_reply(ClientUpdate({"fc.bias": torch.ones(14) * 0.01}, 40, math.nan, epsilon=want / 2), 0, DIGEST,
                      "example")
    with pytest.raises(MessageError, match="privacy accounting differs"):
        check_train_reply(bad, epsilon=want, **kwargs)


def test_client_app_under_dp_sgd_reports_the_epsilon_of_the_rounds_it_was_sampled_for(tiny_splits, tmp_path):
    """The deployment engine starts a fresh ClientApp process per message: a site's accountant
    is rebuilt from the sampling schedule, so the epsilon it reports in round r is that of r
    rounds (fraction_fit 1), whatever it answered before; no training loss is sent."""
    pytest.importorskip("opacus", reason="opacus not installed: pip install -e '.[privacy]'")
    from flwr.app import ConfigRecord, Context, RecordDict
    from fedxray.dpsgd import spec_for
    from fedxray.flower import client_app
    from fedxray.flower.records import to_record
    from fedxray.model import private_norm, trunk_digest
    from fedxray.model import exchanged_keys, get_state
    dirs = write_client_folders(fedxray.partition(tiny_splits["train"], 2, seed=0), tmp_path / "sites")
    config = Config(**{**SECURE, "num_clients": 2, "num_rounds": 3}, dp="example", dp_noise_multiplier=1.0,
                    dp_delta=1e-5)
    ctx = Context(run_id=1, node_id=2, node_config={"data-dir": str(dirs[1]), "client-id": 1}, state=RecordDict(),
                  run_config=run_config_from_config(config))
    torch.manual_seed(config.seed)
    model = private_norm(fedxray.build_model(14, None))
    state = to_record(get_state(model, exchanged_keys(model)))
    spec = spec_for(config, len(fedxray.load_nih(dirs[1])), 1e-5)
    for r in (3, 1):
        sent = RecordDict({"arrays": state, "config": ConfigRecord({"server-round": r, "trunk-digest": trunk_digest(model)})})
        client_app._sites.clear()                                          # a fresh process
        reply = client_app.app(_message(sent, "train"), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        metrics = dict(reply.content["metrics"])
        assert set(metrics) == {"num-examples", "client-id", "epsilon"}
        assert metrics["epsilon"] == pytest.approx(spec.epsilon_after(r), rel=1e-12)


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _secure_strategy(monkeypatch, counts, updates, sent, tamper=None, halted=False, **config):
    """A FedXrayStrategy under secagg whose SecAgg+ round is replaced by its result: the exact
    weighted mean of `updates` (what the protocol unmasks, up to quantisation), each client's clear
    numbers as its ClientApp sends them (tamper(k, metrics) may change them)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from fedxray.flower import secure
    from fedxray.flower.records import IMAGE_LIST_DIGEST, reply_metrics
    from fedxray.flower.strategy import FedXrayStrategy
    from fedxray.parts import strategy_for
    cfg = Config(**{**SECURE, "num_clients": len(counts)}, secagg=True, **config)
    flower = connected(FedXrayStrategy(cfg, strategy_for(cfg, fedxray.build_model(14, None))), counts)
    weights = [secure.client_weight(cfg, n) for n in counts]
    keys = sorted(sent)
    mean = [sum(w * (u.state[k].double() - sent[k].double()) for w, u in zip(weights, updates)).numpy() / sum(weights)
            for k in keys]

    def fake_round(grid, context, server_round, messages, *, max_weight, clip, timeout):
        bridge = secure._Bridge()
        bridge.called = not halted
        for m in messages:
            k = m.metadata.dst_node_id - 10
            metrics = {**reply_metrics(updates[k], k, cfg.dp), IMAGE_LIST_DIGEST: DIGEST}
            if tamper:
                tamper(k, metrics)
            bridge.results.append((secure._node_proxy(m.metadata.dst_node_id),
                                   FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), weights[k], metrics)))
        counting = secure.CountingGrid(grid)
        counting.sent, counting.received = 111, 222
        return bridge, counting
    monkeypatch.setattr(secure, "secure_sum_round", fake_round)
    return flower


def test_secure_round_aggregates_the_unmasked_mean_as_fedxray_and_fails_what_it_cannot_leave_out(monkeypatch):
    from test_flower_faults import server_identity
    server_identity.__wrapped__(monkeypatch)   # the run id new Messages read, as in a ServerApp process
    """FedXrayStrategy.train_secure turns the unmasked weighted mean into fedxray's FedAvg state
    (and, under client-level DP, into ClientLevelDP's noised state from the sum), records the
    protocol's bytes, and fails the round, rather than aggregate, when a client's clear numbers fail
    their checks (its update is already in the sum) or the protocol halted."""
    pytest.importorskip("flwr", reason="flwr not installed: pip install -e '.[flower]'")
    pytest.importorskip("opacus", reason="opacus not installed: pip install -e '.[privacy]'")
    from flwr.app import ConfigRecord
    from fedxray.client import ClientUpdate
    from fedxray.flower.records import to_record, to_state
    from fedxray.flower.strategy import RoundFailed
    counts = [5, 17, 2]
    sent = {"layer4.0.conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(14)}
    g = torch.Generator().manual_seed(2)
    updates = [ClientUpdate({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in sent.items()}, n, 0.1 * (k + 1))
               for k, n in enumerate(counts)]
    grid = _Grid([10, 11, 12])

    flower = _secure_strategy(monkeypatch, counts, updates, sent)
    seen = []
    flower.on_train = lambda r, ids, ups, dropped, sent_bytes, received_bytes=None: seen.append(
        (ids, [u.train_loss for u in ups], sent_bytes, received_bytes))
    arrays, metrics = flower.train_secure(1, to_record(sent), ConfigRecord({}), grid, context=None)
    expected = fedxray.fedavg([u.state for u in updates], counts)
    for key, value in to_state(arrays).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7)
    assert metrics["train_loss"] == pytest.approx(np.average([0.1, 0.2, 0.3], weights=counts))
    assert seen == [([0, 1, 2], [u.train_loss for u in updates], [111], 222)]

    wrong_digest = _secure_strategy(monkeypatch, counts, updates, sent,
                                    tamper=lambda k, m: m.update({"image-list-digest": "cd" * 32} if k == 1 else {}))
    with pytest.raises(RoundFailed, match=r"client 1 \(node 11\).*other images.*already in the sum"):
        wrong_digest.train_secure(1, to_record(sent), ConfigRecord({}), grid, context=None)
    halted = _secure_strategy(monkeypatch, counts, updates, sent, halted=True)
    with pytest.raises(RoundFailed, match="protocol halted"):
        halted.train_secure(1, to_record(sent), ConfigRecord({}), grid, context=None)

    dp = dict(dp="client", dp_noise_multiplier=0.3, dp_clip_norm=1.0)
    private = [ClientUpdate(u.state, u.num_examples, math.nan) for u in updates]
    clipped = [ClientUpdate(fedxray.privacy.clipped_state(u.state, sent, 1.0)[0], u.num_examples, math.nan)
               for u in private]   # what DP clients send: their clipped update
    flower_clipped = _secure_strategy(monkeypatch, counts, clipped, sent, **dp)
    arrays, metrics = flower_clipped.train_secure(1, to_record(sent), ConfigRecord({}), grid, context=None)
    expected = flower_clipped.strategy.aggregate(sent, clipped, 1)
    for key, value in to_state(arrays).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
    assert "train_loss" not in metrics
    loss_under_dp = _secure_strategy(monkeypatch, counts, clipped, sent,
                                     tamper=lambda k, m: m.update({"train_loss": 0.2} if k == 0 else {}), **dp)
    with pytest.raises(RoundFailed, match="no training loss leaves a client under DP"):
        loss_under_dp.train_secure(1, to_record(sent), ConfigRecord({}), grid, context=None)

    # Poisson sampling drew one client: a secure sum of one update is that update, so it is not
    # asked; the round adds noise only and records why.
    from fedxray.federated import round_clients
    sparse = {**dp, "fraction_fit": 0.4}
    flower = _secure_strategy(monkeypatch, counts, clipped, sent, **sparse)
    r = next(r for r in range(1, 100) if len(round_clients(flower.config, r)) == 1)
    seen = []
    flower.on_train = lambda r, ids, ups, dropped, sent_bytes, received_bytes=None: seen.append((ids, dropped))
    arrays, _ = flower.train_secure(r, to_record(sent), ConfigRecord({}), grid, context=None)
    for key, value in flower.strategy.aggregate(sent, [], r).items():
        assert torch.equal(to_state(arrays)[key], value)
    assert seen[0][0] == [] and [d.why for d in seen[0][1]] == ["alone"]


def test_a_site_refuses_an_update_beyond_the_quantisers_range(tiny_splits, tmp_path, monkeypatch):
    """SecAgg+ quantises each update coordinate within [-c, c] and would clip one beyond it without a
    word; the site refuses to send it instead, naming the entry, the size and the remedy; within the
    range it answers in the legacy FitRes form with its update (trained minus global, sorted keys)."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from fedxray.flower import client_app, secure
    from fedxray.flower.records import to_record
    from fedxray.model import exchanged_keys, get_state, private_norm, trunk_digest
    dirs = write_client_folders(fedxray.partition(tiny_splits["train"], 2, seed=0), tmp_path / "sites")
    config = Config(**{**SECURE, "num_clients": 2}, secagg=True)
    ctx = Context(run_id=1, node_id=2, node_config={"data-dir": str(dirs[0]), "client-id": 0}, state=RecordDict(),
                  run_config=run_config_from_config(config))
    torch.manual_seed(config.seed)
    model = private_norm(fedxray.build_model(14, None))
    sent = get_state(model, exchanged_keys(model))
    content = RecordDict({"arrays": to_record(sent),
                          "config": ConfigRecord({"server-round": 1, "trunk-digest": trunk_digest(model)}),
                          "secaggplus_configs": ConfigRecord({})})
    reply = client_app.secure_train(_message(content, "train"), ctx)
    arrays = [a.numpy() for a in reply.content["fitres.parameters"].values()]
    assert len(arrays) == len(sent) and reply.content["fitres.num_examples"]["num_examples"] == len(
        fedxray.load_nih(dirs[0]))
    assert 0 < max(float(np.abs(a).max()) for a in arrays) <= secure.DEFAULT_CLIPPING_RANGE
    monkeypatch.setattr(secure, "clipping_range", lambda config: 1e-9)
    with pytest.raises(ValueError, match=r"client 0, round 1: its update moves '.*' by .* beyond the SecAgg\+ "
                                         r"quantiser's range \+-1e-09 .* nothing was sent. Lower the learning rate"):
        client_app.secure_train(_message(content, "train"), ctx)
