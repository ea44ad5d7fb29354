"""A fit stopped by SIGTERM midway and rerun with ``--ckpt_path last`` ends where an uninterrupted
fit ends: the same step count and the same weights."""

import signal
import subprocess
import sys
import time

import torch

from tests.conftest import REPO

CONFIG = str(REPO / "tests" / "conf" / "low_light_tiny.yaml")
EPOCHS, STEPS_PER_EPOCH = 6, 3  # 6 training pairs, batch 2


def fit_command(root, run) -> list[str]:
    return [
        sys.executable, str(REPO / "lightning_app.py"), "fit", "--config", CONFIG,
        "--data.init_args.root", str(root), "--trainer.default_root_dir", str(run),
        "--trainer.max_epochs", str(EPOCHS), "--trainer.logger", "false",
    ]  # fmt: skip


def test_sigterm_midway_then_ckpt_path_last_ends_with_the_uninterrupted_weights(tmp_path, lol_v1_root):
    run = tmp_path / "run"
    args = fit_command(lol_v1_root, run)
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
    assert 0 < stopped_at < EPOCHS * STEPS_PER_EPOCH

    resumed = subprocess.run([*args, "--ckpt_path", "last"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "interrupted.ckpt" in resumed.stdout + resumed.stderr  # it restored that checkpoint
    resumed_state = torch.load(last, weights_only=True)
    assert resumed_state["global_step"] == EPOCHS * STEPS_PER_EPOCH

    reference = tmp_path / "reference"
    straight = subprocess.run(fit_command(lol_v1_root, reference), capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr
    reference_state = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert reference_state["global_step"] == EPOCHS * STEPS_PER_EPOCH  # last.ckpt is the last epoch's
    for name, weight in reference_state["state_dict"].items():
        torch.testing.assert_close(resumed_state["state_dict"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
