"""Selective scan on CPU: the suite's chunked scan against a sequential loop and mambapy's parallel scan.

    pip install mambapy==1.2.0        # only for this benchmark; not a dependency of the suite
    python benchmarks/selective_scan_speed.py [--threads 2] [--runs 3]

For each (batch, channels, length, state) shape, every method gets the same float32 inputs
(delta in (0, 0.1], A in [-2, 0), random u, B, C, D) and is timed forward alone and forward +
backward (gradients to u, delta, A, B, C, D), in one process, the methods interleaved run by run;
the table gives the median wall time and how many times faster the chunked scan is. The error
column is the largest |output - sequential| relative to max |sequential|. The memory column is
the training memory of one call: a fresh child process per (shape, method) runs one forward +
backward and reports its peak resident set less the resident set with the inputs already made.

* sequential: ``selective_scan_sequential``, the reference loop over time (autograd backward).
* mambapy: mambapy's ``MambaBlock.selective_scan`` (Blelloch parallel scan ``pscan`` with its own
  backward), fed in its (batch, length, channels) layout prepared outside the timing.
* chunked: ``selective_scan`` on CPU (the suite's chunked scan, hand-written backward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones.ops.selective_scan import selective_scan, selective_scan_sequential  # noqa: E402

SHAPES = ((4, 192, 1024, 16), (2, 384, 3136, 16))


def make_inputs(batch: int, channels: int, length: int, state: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "u": torch.randn(batch, channels, length, generator=g),
        "delta": torch.rand(batch, channels, length, generator=g) * 0.1 + 1e-3,
        "A": -torch.rand(channels, state, generator=g) * 2 - 1e-3,
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.randn(channels, generator=g),
    }


def mambapy_method():
    """mambapy's selective scan in its own layout, or None when mambapy is not installed."""
    try:
        from mambapy.mamba import MambaBlock
    except ImportError:
        return None

    def prepare(x):  # ours (batch, channels, length) -> mambapy's (batch, length, channels)
        return {
            "x": x["u"].transpose(1, 2).contiguous(),
            "delta": x["delta"].transpose(1, 2).contiguous(),
            "A": x["A"],
            "B": x["B"].transpose(1, 2).contiguous(),
            "C": x["C"].transpose(1, 2).contiguous(),
            "D": x["D"],
        }

    # selective_scan uses nothing from self: call it unbound
    run = lambda x: MambaBlock.selective_scan(None, **x)  # noqa: E731
    finish = lambda y: y.transpose(1, 2)  # noqa: E731
    return prepare, run, finish


def methods():
    same = lambda x: x  # noqa: E731
    found = {
        "sequential": (same, lambda x: selective_scan_sequential(**x), same),
        "chunked": (same, lambda x: selective_scan(**x, backend="chunked"), same),
    }
    mamba = mambapy_method()
    if mamba is not None:
        found["mambapy"] = mamba
    return found


def timed(run, inputs, backward: bool) -> float:
    if backward:
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
        start = time.perf_counter()
        run(leaves).sum().backward()
    else:
        with torch.no_grad():
            start = time.perf_counter()
            run(inputs)
    return time.perf_counter() - start


def memory_kib(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in KiB.

    Not ``ru_maxrss``: Linux carries that across ``exec``, so a child would report its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def memory_child(name: str, shape: tuple[int, ...], threads: int) -> None:
    """In a fresh process: print the peak memory (MiB) one forward + backward of ``name`` adds."""
    torch.set_num_threads(threads)
    prepare, run, _ = methods()[name]
    inputs = {k: v.detach().requires_grad_() for k, v in prepare(make_inputs(*shape)).items()}
    before = memory_kib("VmRSS")
    run(inputs).sum().backward()
    print(json.dumps({"peak_mib": (memory_kib("VmHWM") - before) / 1024}))


def peak_memory_mib(name: str, shape: tuple[int, ...], threads: int) -> float:
    shape_arg = ",".join(map(str, shape))
    command = [sys.executable, __file__, "--memory-child", name, "--shapes", shape_arg, "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES),
                        help="batch,channels,length,state;...")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if args.memory_child:
        memory_child(args.memory_child, shapes[0], args.threads)
        return
    found = methods()
    if "mambapy" not in found:
        print("mambapy is not installed (pip install mambapy==1.2.0): its rows are left out\n")
    print(f"command: python benchmarks/selective_scan_speed.py --threads {args.threads} --runs {args.runs}")
    print(f"torch {torch.__version__}, {args.threads} CPU threads, float32, median of {args.runs} runs\n")
    print("| shape (B, D, L, N) | method | rel. error | forward (s) | fwd + bwd (s) "
          "| chunked is faster by (fwd + bwd) | fwd + bwd peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        base = make_inputs(*shape)
        prepared = {name: prepare(base) for name, (prepare, _, _) in found.items()}
        with torch.no_grad():
            reference = selective_scan_sequential(**base)
            errors = {
                name: float((finish(run(prepared[name])) - reference).abs().max() / reference.abs().max())
                for name, (_, run, finish) in found.items()
            }
        times = {name: {"fwd": [], "bwd": []} for name in found}
        for _ in range(args.runs):  # interleaved, so a busy spell hits every method alike
            for name, (_, run, _) in found.items():
                times[name]["fwd"].append(timed(run, prepared[name], backward=False))
                times[name]["bwd"].append(timed(run, prepared[name], backward=True))
        medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
        for name in found:
            ratio = medians[name]["bwd"] / medians["chunked"]["bwd"]
            memory = peak_memory_mib(name, shape, args.threads)
            print(f"| {shape} | {name} | {errors[name]:.1e} | {medians[name]['fwd']:.3f} | "
                  f"{medians[name]['bwd']:.3f} | {ratio:.1f}x | {memory:.0f} |", flush=True)


if __name__ == "__main__":
    main()
