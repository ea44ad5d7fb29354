"""TransDAE's efficiency claims on CPU: linear-cost attention, and the networks' cost per CT slice.

    python benchmarks/medical_segmentation_speed.py [--threads 2] [--runs 10]

Table 1: one spatial attention layer (width 64, one head) on a square token grid of growing
side, forward only: TransDAE's efficient attention (``Q (K^T V)``, linear in the tokens), the
same with spatial reduction 2, and full softmax attention (``softmax(Q K^T) V``, quadratic; by
``scaled_dot_product_attention``). Times are medians in milliseconds; the last column is
full / efficient, measured in the same process.

Table 2: each medical_segmentation config's network on one slice at its training size:
parameters, GFLOPs (torch's FLOP counter), median latency per slice (batch 1) and training
throughput (forward + backward, batch 8, slices per second).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from backbones.transdae import EfficientAttention  # noqa: E402
from tasks.medical_segmentation.network import SegmentationNetwork  # noqa: E402

CONFIGS = sorted((ROOT / "configs" / "medical_segmentation").glob("*.yaml"))
NETWORK_ARGS = set(SegmentationNetwork.__init__.__code__.co_varnames) - {"pretrained"}


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def attention_table(runs: int) -> None:
    dim = 64
    efficient, reduced = EfficientAttention(dim, dim, dim), EfficientAttention(dim, dim, dim, sr_ratio=2)
    qkv = torch.nn.Linear(dim, 3 * dim)
    print("| tokens (grid) | efficient (ms) | efficient, reduction 2 (ms) | full softmax (ms) | full / efficient |")
    print("|---|---|---|---|---|")
    for side in (14, 28, 56, 112):
        x = torch.randn(1, side, side, dim)

        def full() -> torch.Tensor:
            q, k, v = qkv(x.reshape(1, side * side, dim)).unsqueeze(1).chunk(3, dim=-1)
            return F.scaled_dot_product_attention(q, k, v)

        with torch.no_grad():
            times = [median_ms(lambda: efficient(x), runs), median_ms(lambda: reduced(x), runs), median_ms(full, runs)]
        print(f"| {side * side} ({side}x{side}) | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} | {times[2] / times[0]:.1f} |")


def network_table(runs: int) -> None:
    print("| config | network | params (M) | GFLOPs / slice | latency (ms / slice) | training (slices / s) |")
    print("|---|---|---|---|---|---|")
    for config in CONFIGS:
        init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
        size = init_args.get("img_size", 224)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in init_args.items() if k in NETWORK_ARGS}
        network = SegmentationNetwork(**kwargs)
        image = torch.rand(1, 1, size, size)
        with torch.no_grad():
            network.eval()
            with FlopCounterMode(display=False) as counter:
                network(image)
            latency = median_ms(lambda: network(image), runs)
        network.train()
        batch = torch.rand(8, 1, size, size)

        def step() -> None:
            network.zero_grad()
            network(batch).square().mean().backward()

        training = 8 / (median_ms(step, max(2, runs // 3)) / 1000)
        params = sum(p.numel() for p in network.parameters()) / 1e6
        name = f"{kwargs.get('backbone', 'transdae')} + {kwargs.get('decoder', 'transdae')} decoder, {size}x{size}"
        print(f"| {config.relative_to(ROOT)} | {name} | {params:.2f} | {counter.get_total_flops() / 1e9:.2f} | "
              f"{latency:.1f} | {training:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"command: python benchmarks/medical_segmentation_speed.py --threads {args.threads} --runs {args.runs}")
    print(f"torch {torch.__version__}, {args.threads} CPU threads, float32\n")
    attention_table(args.runs)
    print()
    network_table(args.runs)


if __name__ == "__main__":
    main()
