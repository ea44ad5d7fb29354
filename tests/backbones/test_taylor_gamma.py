"""Taylor-series gamma against torch.pow over the whole input range, dark pixels included."""

import pytest
import torch

from backbones.ops.taylor_gamma import taylor_gamma

# Worst |error| per order documented in backbones/ops/taylor_gamma.py (squarings=4), with margin.
DOCUMENTED_BOUNDS = {2: 1.1e-3, 3: 7e-5, 4: 5e-6, 6: 1.5e-6, 8: 1.5e-6}


def _grid():
    x = torch.cat([torch.zeros(1), torch.logspace(-12, 0, 3001)]).double()  # 0 and the darkest pixels
    gamma = torch.linspace(0.05, 4.0, 120).double()
    return torch.meshgrid(x, gamma, indexing="ij")


@pytest.mark.parametrize("order,bound", sorted(DOCUMENTED_BOUNDS.items()))
def test_taylor_gamma_error_per_order_is_within_documented_bound(order, bound):
    x, gamma = _grid()
    approx = taylor_gamma(x.float(), gamma.float(), order=order).double()
    error = (approx - torch.pow(x, gamma)).abs()
    assert error.max() <= bound
    # the dark end (x < 0.05) is where a plain series fails; it must meet the same bound
    assert error[x < 0.05].max() <= bound


def test_taylor_gamma_error_shrinks_with_order():
    x, gamma = _grid()
    errors = [(taylor_gamma(x.float(), gamma.float(), order=n).double() - x.pow(gamma)).abs().max() for n in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_plain_series_without_squaring_fails_on_dark_pixels():
    # why the argument halving exists: order 8 with no squaring is far off at x = 1e-3
    x = torch.tensor([1e-3])
    assert (taylor_gamma(x, 1.0, order=8, squarings=0) - x).abs().item() > 0.1


def test_taylor_gamma_is_exact_at_zero_and_one_and_broadcasts():
    x = torch.tensor([[0.0, 1.0, 0.25]])
    gamma = torch.tensor([[0.5], [2.0]])
    out = taylor_gamma(x, gamma)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[:, :2], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(out[:, 2], torch.tensor([0.5, 0.0625]), atol=1e-5, rtol=0)


def test_taylor_gamma_gradients_match_pow():
    x = torch.linspace(0.01, 1.0, 50, dtype=torch.float64).requires_grad_()
    gamma = torch.linspace(0.2, 3.0, 50, dtype=torch.float64).requires_grad_()
    grads = torch.autograd.grad(taylor_gamma(x, gamma, order=8).sum(), (x, gamma))
    expected = torch.autograd.grad(torch.pow(x, gamma).sum(), (x, gamma))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"order": 0}, {"squarings": -1}])
def test_taylor_gamma_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="must be"):
        taylor_gamma(torch.rand(3), 0.5, **kwargs)
