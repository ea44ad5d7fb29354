"""Gamma correction by Taylor series (backbones.ops.taylor_gamma) against torch.pow, on CPU.

    python benchmarks/taylor_gamma_speed.py [--threads 2] [--runs 20]

The input is one 600 x 400 RGB image with a per-pixel, per-channel gamma map (as IAGC's local
gamma), float32. Forward alone and forward + backward (gradients to both the image and gamma),
eager and fused by ``torch.compile`` (which needs a C++ compiler; rows are skipped without one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones.ops.taylor_gamma import taylor_gamma, taylor_gamma_max_error  # noqa: E402


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 400, 600)
    gamma = torch.rand(1, 3, 400, 600) * 1.5 + 0.1

    def forward(fn):
        with torch.no_grad():
            return lambda: fn(x, gamma)

    def backward(fn):
        def run():
            xg, gg = x.clone().requires_grad_(), gamma.clone().requires_grad_()
            fn(xg, gg).sum().backward()

        return run

    candidates = {"torch.pow": lambda a, g: torch.pow(a, g)}
    for order in (2, 4, 6):
        candidates[f"taylor order {order}"] = lambda a, g, n=order: taylor_gamma(a, g, order=n)
    try:
        compiled_pow = torch.compile(lambda a, g: torch.pow(a, g))
        compiled_taylor = torch.compile(lambda a, g: taylor_gamma(a, g, order=4))
        compiled_taylor(x, gamma), compiled_pow(x, gamma)
        candidates["torch.pow, compiled"] = compiled_pow
        candidates["taylor order 4, compiled"] = compiled_taylor
    except Exception as error:  # no compiler available: report eager only
        print(f"(torch.compile unavailable: {type(error).__name__})")

    print(f"command: python benchmarks/taylor_gamma_speed.py --threads {args.threads} --runs {args.runs}")
    print(f"torch {torch.__version__}, {args.threads} CPU threads, x and gamma 1 x 3 x 400 x 600 float32\n")
    print("| method | max abs error vs pow | forward (ms) | forward + backward (ms) |")
    print("|---|---|---|---|")
    for name, fn in candidates.items():
        order = name.split(",")[0].split()[-1]
        error = f"{taylor_gamma_max_error(int(order)):.1e}" if order.isdigit() else "0 (reference)"
        print(f"| {name} | {error} | {median_ms(forward(fn), args.runs):.2f} | {median_ms(backward(fn), args.runs):.2f} |")


if __name__ == "__main__":
    main()
