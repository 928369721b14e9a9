import re

import numpy as np
import pytest
import torch

from fedxray.aggregation import fedavg, state_nbytes

SHAPES = {"conv.weight": (4, 3, 3, 3), "fc.weight": (5, 7), "fc.bias": (5,), "scale": ()}


def random_states(dtype: torch.dtype, counts, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}
            for _ in counts]


def copies(states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fedavg_equals_np_average(dtype):
    counts = [10, 3, 250, 1]
    states = random_states(dtype, counts)
    before = copies(states)
    out = fedavg(states, counts)
    assert list(out) == list(SHAPES)
    for key in SHAPES:
        stacked = np.stack([s[key].double().numpy() for s in states])
        expected = torch.from_numpy(np.asarray(np.average(stacked, axis=0, weights=counts))).to(dtype)
        assert out[key].dtype == dtype and out[key].shape == states[0][key].shape
        # Averaged in float64 and rounded once: within one ulp of the oracle (float64: summation order).
        rtol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
        torch.testing.assert_close(out[key], expected, rtol=rtol, atol=0)
    for s, b in zip(states, before):
        for key in SHAPES:
            assert torch.equal(s[key], b[key])


def test_fedavg_accumulates_in_float64():
    # Summed in float32, 1e8 + 3 rounds to 1e8 and the mean comes out 0; float64 keeps the 3.
    states = [{"w": torch.tensor([v], dtype=torch.float32)} for v in (1e8, 3.0, -1e8)]
    assert fedavg(states, [1, 1, 1])["w"].item() == 1.0


def test_single_client_is_identity_and_a_copy():
    state = random_states(torch.float32, [1])[0]
    out = fedavg([state], [7])
    for key in SHAPES:
        assert torch.equal(out[key], state[key])
        assert out[key].data_ptr() != state[key].data_ptr()


def test_zero_weight_client_is_ignored():
    a, b = random_states(torch.float64, [1, 1])
    out = fedavg([a, b], [1, 0])
    for key in SHAPES:
        assert torch.equal(out[key], a[key])


def test_integer_buffer_is_rounded_weighted_mean():
    counts = [1, 2, 3]
    values = [10, 20, 35]  # weighted mean 25.83 -> 26
    states = [{"bn.num_batches_tracked": torch.tensor(v, dtype=torch.int64),
               "idx": torch.tensor([v, -v, 7], dtype=torch.int32)} for v in values]
    out = fedavg(states, counts)
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert out["bn.num_batches_tracked"].item() == round(np.average(values, weights=counts)) == 26
    assert out["idx"].dtype == torch.int32
    assert out["idx"].tolist() == [26, -26, 7]


def test_integer_buffer_rounds_half_to_even():
    states = [{"n": torch.tensor([1, 2])}, {"n": torch.tensor([2, 3])}]  # means 1.5 and 2.5
    assert fedavg(states, [1, 1])["n"].tolist() == [2, 2]


def test_requires_grad_inputs_give_plain_output():
    p = torch.nn.Parameter(torch.ones(3))
    out = fedavg([{"w": p}, {"w": p.detach() * 3}], [1, 1])
    assert not out["w"].requires_grad
    assert out["w"].tolist() == [2.0, 2.0, 2.0]


def test_state_nbytes():
    state = {"a": torch.zeros(10, dtype=torch.float32), "b": torch.zeros(2, 3, dtype=torch.float16),
             "n": torch.tensor(0, dtype=torch.int64)}
    assert state_nbytes(state) == 40 + 12 + 8
    assert state_nbytes({}) == 0


def f(*values, key="w"):
    return [{key: torch.tensor(v, dtype=torch.float32)} for v in values]


@pytest.mark.parametrize("states, counts, message", [
    ([], [], "at least one"),
    (f([1.0], [2.0]), [1], "2 states but 1 example counts"),
    (f([1.0], [2.0]), [1, -3], "client 1 is negative (-3)"),
    (f([1.0], [2.0]), [1, 2.5], "client 1 must be an integer number of examples, got 2.5"),
    (f([1.0], [2.0]), [4.0, 1], "client 0 must be an integer number of examples, got 4.0"),
    (f([1.0], [2.0]), [True, 1], "client 0 is a bool"),
    (f([1.0], [2.0]), [0, 0], "sum to zero"),
    (f([1.0]) + [{"w": torch.ones(1), "extra": torch.ones(1)}], [1, 1],
     "client 1 has different keys from client 0: missing [], extra ['extra']"),
    ([{"w": torch.ones(1), "b": torch.ones(1)}, {"w": torch.ones(1)}], [1, 1],
     "client 1 has different keys from client 0: missing ['b'], extra []"),
    (f([1.0], [[2.0, 3.0]]), [1, 1], "client 1: 'w' has shape (1, 2), client 0 has (1,)"),
    ([{"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)}], [1, 1],
     "client 1: 'w' has dtype torch.float64, client 0 has torch.float32"),
    (f([1.0], [float("nan"), 1.0], key="fc.bias"), [1, 1], "client 1: 'fc.bias' has 1 non-finite"),
    (f([float("inf"), float("-inf")], [1.0, 1.0]), [1, 1], "client 0: 'w' has 2 non-finite"),
    ([{"flag": torch.tensor([True])}] * 2, [1, 1], "client 0: 'flag' is a bool tensor"),
    ([{"w": torch.ones(1)}, {"w": [1.0]}], [1, 1], "client 1: 'w' is a list, not a tensor"),
])
def test_errors_name_the_culprit(states, counts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fedavg(states, counts)


def test_non_finite_in_zero_weight_client_still_fails():
    with pytest.raises(ValueError, match="client 1: 'w'"):
        fedavg(f([1.0], [float("nan")]), [3, 0])
