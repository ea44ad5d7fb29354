"""Lightning's DDP (gloo, two CPU processes) trains and evaluates like one process.

Two ranks with batch b see, step by step, the same 2b samples as one process with batch 2b (the
training sampler deals one permutation out to the ranks), and DDP averages their gradients, so
the two runs differ only by floating-point summation order. Evaluation shards the test split
without repeating samples, and torchmetrics reduce across the ranks.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

LOW_LIGHT = str(REPO / "tests" / "conf" / "low_light_tiny.yaml")
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def run_cli(*args: str, env: dict | None = None) -> str:
    # DDP re-launches the script for rank 1, so the CLI must run as its own process
    environment = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / "lightning_app.py"), *args], capture_output=True, text=True, timeout=900, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_metrics(output: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"│\s+(test_\w+)\s+│\s+([-\d.e]+)\s+│", output)}


test_metrics.__test__ = False  # a helper, not a test


@pytest.mark.slow
def test_low_light_ddp_two_processes_matches_one_process_with_the_combined_batch(tmp_path, lol_v1_root):
    common = ["--config", LOW_LIGHT, "--data.init_args.root", str(lol_v1_root), "--trainer.max_epochs", "2", "--trainer.logger", "false"]
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    run_cli("fit", *common, *DDP, "--data.init_args.batch_size", "1", "--trainer.default_root_dir", str(ddp_run))
    run_cli("fit", *common, "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(single_run))

    ddp_test = test_metrics(run_cli("test", *common, *DDP, "--trainer.default_root_dir", str(ddp_run), "--ckpt_path", "last"))
    single_test = test_metrics(run_cli("test", *common, "--trainer.default_root_dir", str(single_run), "--ckpt_path", "last"))
    # the same checkpoint scored by one process: evaluation under DDP counts each test image once
    ddp_by_one = test_metrics(run_cli("test", *common, "--trainer.default_root_dir", str(ddp_run), "--ckpt_path", "last"))

    assert set(ddp_test) == {"test_psnr", "test_ssim"}
    assert ddp_test == pytest.approx(ddp_by_one, abs=1e-5)
    assert ddp_test["test_psnr"] == pytest.approx(single_test["test_psnr"], abs=0.01)  # dB
    assert ddp_test["test_ssim"] == pytest.approx(single_test["test_ssim"], abs=1e-3)


POINTS = str(REPO / "tests" / "conf" / "point_segmentation_tiny.yaml")


@pytest.mark.slow
def test_point_segmentation_ddp_two_processes_scores_like_one_process(tmp_path):
    """Variable-size clouds, concatenated with offsets, split across two gloo ranks.

    Evaluation (voting over two samplings) under DDP gives exactly one process's metrics on the
    same checkpoint. Training with batch 1 per rank sees the same rooms per step as one process with
    batch 2, but batch norm sees one room per rank (torch's SyncBatchNorm is GPU-only) and the
    cross-entropy is averaged per rank (rooms differ in point count), so the two fits differ
    slightly: their test metrics agree within 0.05.
    """
    rooms = '{"1": 2, "5": 2, "6": 2}'  # two rooms in every split: no rank is left without one
    common = ["--config", POINTS, "--data.init_args.builtin_rooms", rooms, "--trainer.max_epochs", "3", "--trainer.logger", "false"]
    env = {"GLOCAL_CACHE": str(tmp_path / "cache")}
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    run_cli("fit", *common, *DDP, "--data.init_args.batch_size", "1", "--trainer.default_root_dir", str(ddp_run), env=env)
    run_cli("fit", *common, "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(single_run), env=env)

    ddp_test = test_metrics(run_cli("test", *common, *DDP, "--trainer.default_root_dir", str(ddp_run), "--ckpt_path", "last", env=env))
    ddp_by_one = test_metrics(run_cli("test", *common, "--trainer.default_root_dir", str(ddp_run), "--ckpt_path", "last", env=env))
    single_test = test_metrics(run_cli("test", *common, "--trainer.default_root_dir", str(single_run), "--ckpt_path", "last", env=env))

    assert {"test_miou", "test_macc", "test_allacc"} <= set(ddp_test)
    assert ddp_test == pytest.approx(ddp_by_one, abs=1e-5)
    for name in ("test_miou", "test_macc", "test_allacc"):
        assert ddp_test[name] == pytest.approx(single_test[name], abs=0.05), name
