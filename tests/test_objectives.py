import pytest
import torch
from torch import nn

from fedxray.objectives import Corrected, Objective, Proximal


def _model_and_anchor(seed: int = 0):
    """A small nn.Linear (fp32, as the client's layer4 + fc) and a global state near it."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    params = dict(model.named_parameters())
    anchor = {k: (p.detach() + 0.1 * torch.randn_like(p)) for k, p in params.items()}
    return model, params, anchor


def _bce(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8, 3), generator=g).float()
    return nn.BCEWithLogitsLoss()(model(x), y)


def _train(objective, steps: int = 5, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """Plain SGD on BCE + objective.penalty, as Client.fit combines them."""
    model, params, anchor = _model_and_anchor()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        loss = _bce(model, seed=step)
        penalty = objective.penalty(params, anchor, {})
        opt.zero_grad()
        (loss if penalty is None else loss + penalty).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_plain_objective_adds_and_sends_nothing():
    _, params, anchor = _model_and_anchor()
    assert Objective().penalty(params, anchor, {}) is None
    assert Objective().reply(params, anchor, {}, 3, 0.1) == {}


def test_proximal_with_mu_zero_is_plain_bce_training_bitwise():
    _, params, anchor = _model_and_anchor()
    assert Proximal(0.0).penalty(params, anchor, {}) is None
    plain, prox0, prox = _train(Objective()), _train(Proximal(0.0)), _train(Proximal(0.5))
    assert all(torch.equal(plain[k], prox0[k]) for k in plain)
    assert not all(torch.equal(plain[k], prox[k]) for k in plain)   # the comparison can fail


def test_proximal_gradient_is_bce_gradient_plus_mu_times_distance():
    mu = 0.3
    model, params, anchor = _model_and_anchor()
    names = list(params)
    penalty = Proximal(mu).penalty(params, anchor, {})
    assert penalty.shape == () and penalty.dtype == torch.float32
    expected = 0.5 * mu * sum(float(((params[k].detach().double() - anchor[k].double()) ** 2).sum()) for k in names)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    with_penalty = torch.autograd.grad(_bce(model) + penalty, [params[k] for k in names])
    bce_only = torch.autograd.grad(_bce(model), [params[k] for k in names])
    for k, g, g0 in zip(names, with_penalty, bce_only):
        torch.testing.assert_close(g, g0 + mu * (params[k].detach() - anchor[k]))


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_proximal_refuses_bad_mu(mu):
    with pytest.raises(ValueError, match="proximal_mu"):
        Proximal(mu)


def test_proximal_names_a_missing_anchor_entry():
    _, params, anchor = _model_and_anchor()
    del anchor["bias"]
    with pytest.raises(ValueError, match="anchor.*missing \\['bias'\\]"):
        Proximal(0.1).penalty(params, anchor, {})


def test_corrected_penalty_gradient_is_the_correction():
    _, params, anchor = _model_and_anchor()
    d = {k: torch.randn_like(p) for k, p in params.items()}
    penalty = Corrected().penalty(params, anchor, d)
    assert penalty.shape == () and penalty.dtype == torch.float32
    expected = sum(float((params[k].detach().double() * d[k].double()).sum()) for k in params)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    grads = torch.autograd.grad(penalty, list(params.values()))
    for k, g in zip(params, grads):
        assert torch.equal(g, d[k]), k


def test_corrected_reply_is_the_new_control_variate_of_option_two():
    # Karimireddy et al. 2020, Algorithm 1 option II: c_i+ = c_i - c + (x - y) / (K * lr), written
    # with c and c_i apart; the client sees only d = c - c_i.
    _, params, anchor = _model_and_anchor()
    g = torch.Generator().manual_seed(3)
    c = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    c_i = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    d = {k: c[k] - c_i[k] for k in params}
    steps, lr = 7, 0.05
    reply = Corrected().reply(params, anchor, d, steps, lr)
    assert list(reply) == list(params)
    for k, p in params.items():
        expected = c_i[k].double() - c[k].double() + (anchor[k].double() - p.detach().double()) / (steps * lr)
        assert reply[k].dtype == torch.float32 and reply[k].device.type == "cpu" and not reply[k].requires_grad
        torch.testing.assert_close(reply[k].double(), expected, rtol=1e-6, atol=1e-6)


def test_corrected_refuses_missing_payload_and_bad_steps():
    _, params, anchor = _model_and_anchor()
    d = {"weight": torch.zeros(3, 4)}
    with pytest.raises(ValueError, match="payload.*missing \\['bias'\\]"):
        Corrected().penalty(params, anchor, d)
    with pytest.raises(ValueError, match="payload.*missing \\['bias'\\]"):
        Corrected().reply(params, anchor, d, 3, 0.1)
    d["bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="steps"):
        Corrected().reply(params, anchor, d, 0, 0.1)
    with pytest.raises(ValueError, match="lr"):
        Corrected().reply(params, anchor, d, 3, 0.0)
