"""TransNeXt on CPU: throughput against timm models of similar size, FLOPs, and peak memory.

    python benchmarks/transnext_throughput.py throughput [--threads 2] [--batch 8] [--rounds 5]
    python benchmarks/transnext_throughput.py flops
    python benchmarks/transnext_throughput.py memory [--threads 2] [--batch 1] [--sizes 224 448 896]

``throughput``: images/s at 224 x 224 (untrained weights, eval, no_grad, float32). The models run
in turn, round after round, in one process, and each keeps its best round: on a shared machine
that makes the ratios between models meaningful even when the absolute figures are not.

``flops``: parameters and multiply-accumulates at 224 x 224 of the four variants beside the
paper's figures. ``torch.utils.flop_counter`` counts matrix products and convolutions (reported
as GMACs = FLOPs / 2, the unit of the paper's "FLOPs"); the sliding window's dot products are
element-wise here and are added analytically (18 MACs per channel per token and block).

``memory``: peak resident memory of a fresh process for one forward pass at each size, minus
the same process's memory before that pass (weights, libraries), so the figure is what the
activations need; with linear memory it grows 4x from 224 to 448 and 16x to 896.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import timm  # noqa: E402

import backbones  # noqa: E402,F401  (registers TransNeXt)

PAPER = {  # Table 1 of the paper: parameters (M), FLOPs (G) at 224
    "transnext_micro": (12.8, 2.7),
    "transnext_tiny": (28.2, 5.7),
    "transnext_small": (49.7, 10.3),
    "transnext_base": (89.7, 18.4),
}
PEERS = ["transnext_micro", "transnext_tiny", "convnext_tiny", "swin_tiny_patch4_window7_224", "pvt_v2_b2"]


def throughput(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    models = {name: timm.create_model(name).eval() for name in args.models}
    best = {name: float("inf") for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x)  # warm-up
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                best[name] = min(best[name], time.perf_counter() - start)
    reference = args.models[-1]
    print(f"torch {torch.__version__}, {args.threads} CPU threads, batch {args.batch} x 3 x 224 x 224, float32, "
          f"best of {args.rounds} interleaved rounds\n")
    print(f"| model | params (M) | images/s | relative to {reference} |")
    print("|---|---|---|---|")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        rate = args.batch / best[name]
        print(f"| {name} | {params:.1f} | {rate:.2f} | {best[reference] / best[name]:.2f} |")


def window_macs(model: torch.nn.Module, size: int) -> int:
    """Multiply-accumulates of the sliding window's dot products (not seen by the flop counter)."""
    total, side = 0, size
    for stage in model.stages:
        side = -(-side // (4 if side == size else 2))
        if stage.window_size is not None:
            for block in stage.blocks:
                total += 2 * stage.window_size**2 * side * side * block.attn.num_heads * block.attn.head_dim
    return total


def flops(args: argparse.Namespace) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    print("| variant | params (M) | paper params (M) | GMACs at 224 | paper GFLOPs at 224 |")
    print("|---|---|---|---|---|")
    x = torch.randn(1, 3, 224, 224)
    for name, (paper_params, paper_flops) in PAPER.items():
        model = timm.create_model(name).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        macs = counter.get_total_flops() / 2 + window_macs(model, 224)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name} | {params:.2f} | {paper_params} | {macs / 1e9:.2f} | {paper_flops} |")


def _memory_child(name: str, size: int, batch: int, threads: int) -> None:
    """Runs in a fresh process: print the activation memory (kB) of one forward pass."""
    torch.set_num_threads(threads)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # load kernels and allocator state outside the measurement
        x = torch.randn(batch, 3, size, size)
        before = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024
        model(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_kb": peak - before}))


def memory(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {args.threads} CPU threads, batch {args.batch}, eval, float32; "
          "MB above the process's memory before the forward pass (weights excluded)\n")
    header = " | ".join(f"{s} x {s} (MB, x{(s / args.sizes[0]) ** 2:.0f} pixels)" for s in args.sizes)
    print(f"| model | {header} |")
    print("|---|" + "---|" * len(args.sizes))
    for name in args.models:
        cells = []
        for size in args.sizes:
            run = subprocess.run(
                [sys.executable, __file__, "_memory_child", name, str(size), str(args.batch), str(args.threads)],
                capture_output=True, text=True,
            )  # fmt: skip
            if run.returncode != 0:
                cells.append("failed: " + (run.stderr.strip().splitlines() or ["?"])[-1][:60])
                continue
            megabytes = json.loads(run.stdout.strip().splitlines()[-1])["delta_kb"] / 1024
            cells.append(f"{megabytes:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_memory_child":
        _memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("throughput")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--batch", type=int, default=8)
    run.add_argument("--rounds", type=int, default=5)
    run.add_argument("--models", nargs="+", default=PEERS, help="the last one is the reference of the ratios")
    commands.add_parser("flops")
    mem = commands.add_parser("memory")
    mem.add_argument("--threads", type=int, default=2)
    mem.add_argument("--batch", type=int, default=1)
    mem.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 896])
    mem.add_argument("--models", nargs="+", default=["transnext_micro", "transnext_tiny", "convnext_tiny", "pvt_v2_b2"])
    args = parser.parse_args()
    print("command: python benchmarks/transnext_throughput.py " + " ".join(sys.argv[1:]))
    {"throughput": throughput, "flops": flops, "memory": memory}[args.command](args)


if __name__ == "__main__":
    main()
