"""VBReg against open3d RANSAC and FGR on the same test pairs and FPFH features: recall and time per pair.

    python benchmarks/registration_vs_ransac.py --run runs/registration/vbreg_builtin --threads 2

Loads the run's best checkpoint and its datamodule (the built-in rooms by default), then for every
test pair times, in the same process and one after the other:

* VBReg: the network's prior pass plus the voting-based inlier search (given the K correspondences),
  and separately the mutual-nearest-neighbour matching that produces them (from cached FPFH);
* RANSAC on the FPFH features (open3d, 3-point samples, edge-length 0.9 and distance checkers,
  inlier distance tau, up to 100 000 iterations, confidence 0.999; the "RANSAC" rows of the
  papers' FPFH tables), which does its own feature matching;
* RANSAC on exactly VBReg's K correspondences, same settings;
* both RANSAC variants once per ``--seeds`` value (open3d's sampler reseeded before every pair):
  on a few dozen pairs their recall moves by a few points from seed to seed;
* FGR on the FPFH features.

FPFH extraction is shared by all methods and excluded. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (trainer.default_root_dir) or .ckpt")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and open3d")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N test pairs (0 = all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RANSAC seeds, one row each")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # open3d's OpenMP reads it at import

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np
    import torch

    from data.correspondences import match_features
    from tasks.leaderboard import load_run, resolve_run
    from tasks.registration_parts import baselines

    torch.set_num_threads(args.threads)
    checkpoint = resolve_run(args.run)
    task, datamodule = load_run(checkpoint)
    datamodule.prepare_data()
    datamodule.setup("test")
    dataset = datamodule.datasets["test"]
    count = len(dataset) if args.limit <= 0 else min(args.limit, len(dataset))
    tau = task.hparams.inlier_threshold
    iterations, confidence = task.hparams.ransac_iterations, task.hparams.ransac_confidence
    methods = {"VBReg (network + search)": task.predict_batch}
    for seed in args.seeds:
        methods[f"RANSAC-{iterations // 1000}k (FPFH), seed {seed}"] = partial(
            baselines.ransac_on_features, tau=tau, max_iterations=iterations, confidence=confidence, seed=seed
        )
    for seed in args.seeds:
        methods[f"RANSAC-{iterations // 1000}k (K correspondences), seed {seed}"] = partial(
            baselines.ransac_on_correspondences, tau=tau, max_iterations=iterations, confidence=confidence, seed=seed
        )
    methods["FGR (FPFH)"] = partial(baselines.fast_global_registration, tau=tau)
    metrics = {name: task.configure_metrics() for name in methods}
    times: dict[str, list[float]] = {name: [] for name in methods}
    matching: list[float] = []
    with torch.no_grad():
        batch = datamodule.collate_fn([dataset[0]])
        task.predict_batch(batch)  # warm-up
        for index in range(count):
            batch = datamodule.collate_fn([dataset[index]])
            start = time.perf_counter()
            match_features(batch["src_features"].numpy(), batch["tgt_features"].numpy())
            matching.append(time.perf_counter() - start)
            for name, method in methods.items():
                start = time.perf_counter()
                prediction = method(batch)
                times[name].append(time.perf_counter() - start)
                task.update_metrics(metrics[name], prediction, batch)

    ransac = statistics.median(times[f"RANSAC-{iterations // 1000}k (FPFH), seed {args.seeds[0]}"])
    print(f"`python benchmarks/registration_vs_ransac.py --run {args.run} --threads {args.threads}"
          + (f" --limit {args.limit}" if args.limit else "") + f" --seeds {' '.join(map(str, args.seeds))}`"
          + f" ({count} pairs, {datamodule.dataset_name}; last column against RANSAC (FPFH), seed {args.seeds[0]})\n")
    print("| method | RR (%) | RRE (deg) | RTE (cm) | inlier P / R / F1 (%) | median s / pair | mean s / pair | median time / RANSAC's |")
    print("|---|---|---|---|---|---|---|---|")
    rows = list(methods) + ["VBReg + mutual matching"]
    for name in rows:
        if name == "VBReg + mutual matching":
            values = metrics["VBReg (network + search)"].compute()
            spent = [a + b for a, b in zip(times["VBReg (network + search)"], matching)]
        else:
            values = metrics[name].compute()
            spent = times[name]
        v = {k: float(x) for k, x in values.items()}
        print(f"| {name} | {v['rr']:.1f} | {v['rre']:.2f} | {v['rte']:.2f} | "
              f"{v['inlier_precision']:.1f} / {v['inlier_recall']:.1f} / {v['inlier_f1']:.1f} | "
              f"{statistics.median(spent):.3f} | {np.mean(spent):.3f} | {statistics.median(spent) / ransac:.2f} |")


if __name__ == "__main__":
    main()
