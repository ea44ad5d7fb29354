"""Lightning's DDP (gloo, two CPU processes) trains and evaluates like one process.

Two ranks with batch b see, step by step, the same 2b samples as one process with batch 2b (the
training sampler deals one permutation out to the ranks), and DDP averages their gradients, so
the two runs differ only by floating-point summation order. Evaluation shards the test split
without repeating samples, and torchmetrics reduce across the ranks.
"""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

LOW_LIGHT = str(REPO / "tests" / "conf" / "low_light_tiny.yaml")
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def run_cli(*args: str) -> str:
    # DDP re-launches the script for rank 1, so the CLI must run as its own process
    result = subprocess.run([sys.executable, str(REPO / "lightning_app.py"), *args], capture_output=True, text=True, timeout=900)
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
