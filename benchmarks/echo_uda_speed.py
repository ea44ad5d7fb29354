"""GraphEcho speed: training-step time of each ablation and frame-segmentation latency.

    python benchmarks/echo_uda_speed.py --threads 2 --steps 5

For every configs/echo_uda/*_builtin.yaml it times the training step (forward, backward and
optimiser step on one synthetic batch of the config's shape) and, for the built-in and the
paper-scale segmentors, the inference latency per frame, parameters and GFLOPs per frame.
Everything runs in one process, so the ratios between rows are comparable even on a busy
machine; absolute times are not.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, as the other benchmarks

from tasks.echo_uda.task import EchoVideoSegmentation  # noqa: E402


def model_from(config: Path) -> tuple[EchoVideoSegmentation, dict]:
    spec = yaml.safe_load(config.read_text())
    return EchoVideoSegmentation(**spec["model"]["init_args"]), spec["data"]["init_args"]


def synthetic_batch(data: dict) -> dict:
    """A (source, target) batch of the config's shape: clips of two blocks on noise."""
    clips, length, size = data.get("batch_size", 2), data.get("clip_length", 16), data.get("crop", 64)

    def side() -> dict:
        mask = torch.zeros(clips, length, size, size, dtype=torch.long)
        mask[..., size // 4 : size // 2, size // 5 : size // 2] = 1
        mask[..., size // 2 : 3 * size // 4, size // 2 : 4 * size // 5] = 2
        video = 0.6 - 0.5 * (mask > 0).float()[:, :, None] + 0.1 * torch.rand(clips, length, 1, size, size)
        return {"video": video, "mask": mask, "labelled": torch.ones(clips, length, dtype=torch.bool)}

    return {"source": side(), "target": side()}


def time_training_step(task: EchoVideoSegmentation, batch: dict, steps: int) -> float:
    """Median seconds per training step."""
    task.log = task.log_dict = lambda *args, **kwargs: None
    optimiser = torch.optim.AdamW(task.parameters(), lr=1e-3)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = task.training_step(batch, step)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def frame_latency(task: EchoVideoSegmentation, size: int, frames: int, runs: int) -> tuple[float, float]:
    """(median ms per frame, GFLOPs per frame) of the inference graph on ``frames`` frames."""
    module = task.inference_module().eval()
    x = torch.rand(frames, 1, size, size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            module(x)
        module(x)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1000 / frames)
    return statistics.median(times), counter.get_total_flops() / 1e9 / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {args.threads} threads\n")
    print("| built-in config | adaptation | params (M) | s / training step | x source only |")
    print("|---|---|---|---|---|")
    rows, baseline = [], None
    for config in sorted((REPO / "configs" / "echo_uda").glob("*_builtin.yaml")):
        task, data = model_from(config)
        seconds = time_training_step(task, synthetic_batch(data), args.steps)
        if task.hparams.adaptation == "none" and baseline is None:
            baseline = seconds
        rows.append((config.name, task.hparams.adaptation, sum(p.numel() for p in task.parameters()) / 1e6, seconds))
    for name, adaptation, params, seconds in rows:
        print(f"| {name} | {adaptation} | {params:.3f} | {seconds:.3f} | {seconds / baseline:.2f} |")

    print("\n| segmentor (config) | input | params (M) | GFLOPs / frame | ms / frame |")
    print("|---|---|---|---|---|")
    for name, size, frames in (("graphecho_builtin.yaml", 64, 32), ("graphecho_camus_echonet.yaml", 112, 8), ("graphecho_cardiac_uda.yaml", 256, 4)):
        task, _ = model_from(REPO / "configs" / "echo_uda" / name)
        ms, gflops = frame_latency(task, size, frames, args.runs)
        params = sum(p.numel() for p in task.inference_module().parameters()) / 1e6
        print(f"| {task.backbone_name} FPN ({name}) | {size} x {size} | {params:.2f} | {gflops:.2f} | {ms:.1f} |")
    print(f"\ncommand: python benchmarks/echo_uda_speed.py --threads {args.threads} --steps {args.steps} --runs {args.runs}")


if __name__ == "__main__":
    main()
