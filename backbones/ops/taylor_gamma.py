"""Gamma correction ``x ** gamma`` by a truncated Taylor series.

IAGC (Wang et al., "Low-Light Image Enhancement with Illumination-Aware Gamma Correction and
Complete Image Modelling Network", ICCV 2023, Sec. 3) replaces the exponential in gamma
correction by a Taylor series. The paper does not fix the expansion point, so this module
states its own choice and measures it (``tests/backbones/test_taylor_gamma.py``):

    x ** gamma = exp(t),  t = gamma * ln(x)
    exp(t)     = exp(t / 2**s) ** (2**s)          (argument halving, "scaling and squaring")
    exp(u)    ~= sum_{n=0..order} u**n / n!       (Maclaurin series, Horner's rule)

Without the halving the series fails on the dark pixels that matter most here: at
``x = 1e-3`` and ``gamma = 1``, ``t = -6.9``, and an order-16 series is still off by 0.5.
``t`` is clamped at ``-t_floor = -16`` (``exp(-16) = 1.1e-7``, far below one 16-bit grey level),
so with 4 squarings ``|u| <= 1`` and the series is accurate everywhere. ``x = 0`` gives exactly 0.

Worst absolute error against ``torch.pow`` over ``x in {0} U [1e-12, 1]`` and
``gamma in [0.05, 4]`` (float64 reference, float32 evaluation, ``squarings=4``; printed by
``python -m backbones.ops.taylor_gamma``):

    order 1: 1.7e-2   order 2: 1.0e-3   order 3: 5.9e-5   order 4: 3.5e-6   order 6: 8.0e-7

From order 5 on the error is float32 rounding amplified by the squarings. The default
``order=4`` is below 1/255 by three orders of magnitude, at 4 multiply-adds per pixel.
"""

from __future__ import annotations

import torch

_LOG_GUARD = 1e-12  # keeps ln finite; x = 0 itself is mapped to 0 exactly


def taylor_gamma(
    x: torch.Tensor,
    gamma: torch.Tensor | float,
    order: int = 4,
    squarings: int = 4,
    t_floor: float = 16.0,
) -> torch.Tensor:
    """Approximate ``x ** gamma`` for ``x >= 0`` with a Taylor series of ``order`` terms.

    Args:
        x: non-negative input, any shape.
        gamma: exponent, broadcastable to ``x`` (a per-image scalar or a per-pixel map).
        order: highest power kept in the series (>= 1).
        squarings: number of argument halvings; the result is squared this many times.
        t_floor: ``gamma * ln(x)`` is clamped at ``-t_floor`` (results below ``exp(-t_floor)``).

    Returns:
        A tensor of the broadcast shape of ``x`` and ``gamma``, differentiable in both.
    """
    if order < 1:
        raise ValueError(f"taylor_gamma: order must be >= 1, got {order}")
    if squarings < 0:
        raise ValueError(f"taylor_gamma: squarings must be >= 0, got {squarings}")
    t = gamma * torch.log(x.clamp_min(_LOG_GUARD))
    u = t.clamp_min(-t_floor) * (0.5**squarings)
    # Horner's rule: 1 + u(1 + u/2(1 + u/3(...(1 + u/order))))
    y = 1.0 + u / order
    for n in range(order - 1, 0, -1):
        y = 1.0 + (u / n) * y
    for _ in range(squarings):
        y = y * y
    return torch.where(x > 0, y, torch.zeros_like(y))


def taylor_gamma_max_error(order: int, squarings: int = 4) -> float:
    """Worst absolute error against ``torch.pow`` on the grid described in the module docstring."""
    x = torch.cat([torch.zeros(1), torch.logspace(-12, 0, 6001)]).double()
    gamma = torch.linspace(0.05, 4.0, 200).double()
    xx, gg = torch.meshgrid(x, gamma, indexing="ij")
    approx = taylor_gamma(xx.float(), gg.float(), order=order, squarings=squarings).double()
    return float((approx - torch.pow(xx, gg)).abs().max())


if __name__ == "__main__":  # prints the table quoted in the module docstring
    for n in (1, 2, 3, 4, 5, 6, 8):
        print(f"order {n}: max |error| = {taylor_gamma_max_error(n):.1e}")
