"""IAGC inference latency for one 600 x 400 image (LOL's size) on this machine's CPU.

    python benchmarks/low_light_latency.py [--threads 2] [--runs 10]

Prints a Markdown table: configuration, parameters, GFLOPs, median and best latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.low_light import IAGCNet  # noqa: E402

CONFIGS = ["configs/low_light/iagc_builtin.yaml", "configs/low_light/iagc_lol_v1.yaml"]
NETWORK_ARGS = set(IAGCNet.__init__.__code__.co_varnames)


def network_from_config(path: str) -> IAGCNet:
    init_args = yaml.safe_load(Path(path).read_text())["model"]["init_args"]
    return IAGCNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in init_args.items() if k in NETWORK_ARGS})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = torch.rand(1, 3, 400, 600)
    print(f"command: python benchmarks/low_light_latency.py --threads {args.threads} --runs {args.runs}")
    print(f"torch {torch.__version__}, {args.threads} CPU threads, input 1 x 3 x 400 x 600, float32\n")
    print("| config | params (M) | GFLOPs | median latency (ms) | best (ms) |")
    print("|---|---|---|---|---|")
    for config in CONFIGS:
        net = network_from_config(config).eval()
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                net(image)
            net(image)  # warm-up
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                net(image)
                times.append((time.perf_counter() - start) * 1000)
        params = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"| {config} | {params:.3f} | {counter.get_total_flops() / 1e9:.1f} | "
              f"{statistics.median(times):.0f} | {min(times):.0f} |")


if __name__ == "__main__":
    main()
