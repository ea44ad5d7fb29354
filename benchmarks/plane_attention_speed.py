"""Disassembled plane-window attention against cubic-window attention of the same window side.

    python benchmarks/plane_attention_speed.py [--sizes 20000 100000 400000] [--threads 1] [--runs 3]

Inputs: indoor rooms from the built-in generator (laser-scanned with open3d, so surfaces,
occlusion and clutter as in a real scan), voxelized at 4 cm, copied side by side until the
scene holds N occupied voxels ("points": after grid sampling, one point per voxel). Both layers
attend on these voxels with the first ConDaFormer encoder stage's sizes on S3DIS: 96 channels,
6 heads of 16, window side 8, position quantisation 0.25, relative position tables for q, k, v.
``plane``: three planar windows (8, 8, 1), (8, 1, 8), (1, 8, 8), two heads each; ``cubic``: one
(8, 8, 8) window, all six heads, i.e. the same range on every axis.

Each (method, N) runs in its own child process, so its peak memory is its own: the table gives
the peak resident set (``VmHWM``) after the timed forwards less the resident set once the
inputs are built (window partition and attention, ``no_grad``, float32), the median wall time and
the median CPU time of the process (``time.process_time``, which a busy machine distorts least),
and the largest padded window. Memory per voxel shows whether memory grows linearly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones.ops.plane_attention import PlaneWindowAttention  # noqa: E402

HEADS, HEAD_DIM, WINDOW, QUANT, VOXEL = 6, 16, 8, 0.25, 0.04


def scanned_voxels(count: int) -> torch.Tensor:
    """(count, 3) integer voxel coordinates of generated rooms placed side by side along x."""
    from data.builtin_rooms import generate_room, scan_room

    rooms, total, shift, seed = [], 0, 0, 0
    while total < count:
        room = generate_room(np.random.default_rng([seed, 11]))
        coord, _, _ = scan_room(room, 60000, scans=3)
        grid = np.unique(np.floor((coord - coord.min(0)) / VOXEL).astype(np.int64), axis=0)
        grid[:, 0] += shift
        shift = int(grid[:, 0].max()) + 25  # a metre of empty space between rooms
        rooms.append(grid)
        total += len(grid)
        seed += 1
    return torch.from_numpy(np.concatenate(rooms)[:count])


def memory_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in KiB.

    Not ``ru_maxrss``: Linux carries that across ``exec``, so a worker would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def worker(kind: str, scene: Path, size: int, runs: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    grid = torch.from_numpy(np.load(scene)[:size])
    batch = torch.zeros(len(grid), dtype=torch.long)
    positions = grid.float() + 0.5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(grid), HEADS, HEAD_DIM, generator=g) for _ in range(3))
    layer = PlaneWindowAttention(HEADS, HEAD_DIM, WINDOW, QUANT, kind=kind).eval()
    before = memory_kib("VmRSS")
    walls, cpus = [], []
    with torch.no_grad():
        for _ in range(runs):
            wall, cpu = time.perf_counter(), time.process_time()
            tables = layer.partition(grid, batch)
            layer(q * HEAD_DIM**-0.5, k, v, positions, tables)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    peak = memory_kib("VmHWM") - before
    return {
        "kind": kind, "voxels": size, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
        "peak_mib": peak / 1024, "longest_window": max(t.shape[1] for t in tables),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000, 400000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "SCENE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]), int(args.worker[2]), args.runs, args.threads)))
        return
    folder = tempfile.mkdtemp(prefix="plane_attention_")
    scene = Path(folder) / "voxels.npy"
    np.save(scene, scanned_voxels(max(args.sizes)).numpy())  # generated once, shared by the workers
    print(f"command: python benchmarks/plane_attention_speed.py --sizes {' '.join(map(str, args.sizes))} "
          f"--runs {args.runs} --threads {args.threads}")  # fmt: skip
    print(f"torch {torch.__version__}, {args.threads} thread(s), window {WINDOW}, {HEADS} heads x {HEAD_DIM}, voxel {VOXEL} m\n")
    print("| voxels | attention | longest window | wall (s) | CPU (s) | peak memory (MiB) | memory per voxel (KiB) | plane is faster by (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        rows = {}
        for kind in ("plane", "cubic"):
            command = [sys.executable, __file__, "--worker", kind, str(scene), str(size), "--runs", str(args.runs), "--threads", str(args.threads)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"| {size} | {kind} | failed: {result.stderr.strip().splitlines()[-1]} |||||")
                continue
            rows[kind] = json.loads(result.stdout.strip().splitlines()[-1])
        for kind, row in rows.items():
            ratio = rows["cubic"]["cpu_s"] / row["cpu_s"] if "cubic" in rows else float("nan")
            print(f"| {size} | {kind} | {row['longest_window']} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | "
                  f"{row['peak_mib']:.0f} | {row['peak_mib'] * 1024 / size:.1f} | {ratio:.2f}x |", flush=True)  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
