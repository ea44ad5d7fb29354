"""A fit stopped by SIGTERM midway resumes from where it stopped with ``--ckpt_path last``."""

import signal
import subprocess
import sys
import time

import torch

from tests.conftest import REPO

CONFIG = str(REPO / "tests" / "conf" / "low_light_tiny.yaml")


def test_sigterm_midway_then_ckpt_path_last_resumes(tmp_path, lol_v1_root):
    run = tmp_path / "run"
    args = [
        sys.executable, str(REPO / "lightning_app.py"), "fit", "--config", CONFIG,
        "--data.init_args.root", str(lol_v1_root), "--trainer.default_root_dir", str(run),
        "--trainer.max_epochs", "12", "--trainer.logger", "false",
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the fit ended before it could be interrupted:\n" + process.stdout.read()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)

    interrupted = run / "checkpoints" / "interrupted.ckpt"
    assert interrupted.exists()
    stopped_at = torch.load(interrupted, weights_only=True)["global_step"]
    assert 0 < stopped_at < 12 * 3  # 6 training pairs, batch 2: 3 steps per epoch

    resumed = subprocess.run([*args, "--ckpt_path", "last"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "interrupted.ckpt" in resumed.stdout + resumed.stderr  # it restored that checkpoint
    assert torch.load(last, weights_only=True)["global_step"] == 12 * 3
