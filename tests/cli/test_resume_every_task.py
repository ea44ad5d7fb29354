"""Every task: a fit stopped by SIGTERM midway and resumed with ``--ckpt_path last`` ends with the
weights (and so the test metrics) of a fit that was never stopped, with the same seed.

The signal is sent by the process to itself from a callback at a fixed step, so the test does
not race a subprocess; the stop itself goes through the CLI's own SIGTERM handling
(``tasks.callbacks.InterruptCheckpoint``). ``tests/cli/test_interrupt.py`` covers a real
external SIGTERM to a separate process.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from lightning_app import main
from tests.conftest import REPO


class SigtermAtStep(Callback):
    """Sends SIGTERM to this process once the given global step has been trained."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def case_args(name: str, request) -> tuple[list[str], int, int]:
    """(CLI arguments, epochs, the step at which to interrupt: inside an epoch after the first)."""
    if name == "low_light":
        root = request.getfixturevalue("lol_v1_root")  # 6 training pairs after the hold-out: 3 steps per epoch
        return ["--config", str(REPO / "tests/conf/low_light_tiny.yaml"), "--data.init_args.root", str(root)], 3, 4
    if name == "scene_classification":
        from tests.data.test_scene_folders import write_class_folders

        root = write_class_folders(request.getfixturevalue("tmp_path") / "AID", {"beach": 8, "forest": 8, "river": 8})
        # 9 training images (train 50 %, a quarter of it held out), batches of 4: 2 steps per epoch
        return ["--config", str(REPO / "tests/conf/scene_classification_tiny.yaml"), "--data.init_args.root", str(root)], 3, 3
    if name == "medical_segmentation":
        from tests.data.synapse_files import write_transunet

        root = write_transunet(request.getfixturevalue("tmp_path") / "Synapse")
        # 6 or 7 training slices after the held-out case, batches of 2 (the last dropped): 3 steps per epoch
        tiny = ["--config", str(REPO / "tests/conf/medical_segmentation_tiny.yaml"), "--data.init_args.batch_size", "2"]
        return [*tiny, "--data.init_args.root", str(root)], 3, 4
    if name == "echo_uda":  # 4 source/target clip pairs per epoch, batches of 2: 2 steps per epoch
        return ["--config", str(REPO / "tests/conf/echo_uda_tiny.yaml")], 3, 3
    if name == "point_segmentation":  # two training rooms, one per batch: 2 steps per epoch
        return ["--config", str(REPO / "tests/conf/point_segmentation_tiny.yaml"), "--data.init_args.batch_size", "1"], 3, 3
    if name == "registration":
        return ["--config", str(REPO / "tests/conf/registration_tiny.yaml")], 3, 3
    raise KeyError(name)


CASES = ["low_light", "scene_classification", "medical_segmentation", "echo_uda", "point_segmentation", "registration"]


@pytest.fixture
def one_thread():
    """Bit-exact comparisons need one thread: multi-threaded CPU scatter/index-add reductions (the
    sparse point-cloud ops) sum in a varying order, so two uninterrupted fits differ in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", CASES)
def test_sigterm_midway_then_resume_matches_an_uninterrupted_fit(name, request, tmp_path, one_thread):
    args, epochs, stop_step = case_args(name, request)
    common = [*args, "--trainer.max_epochs", str(epochs), "--trainer.logger", "false"]
    signal_callback = json.dumps({"class_path": f"{__name__}.SigtermAtStep", "init_args": {"step": stop_step}})

    interrupted_run, straight_run = tmp_path / "interrupted", tmp_path / "straight"
    stop = ["--trainer.default_root_dir", str(interrupted_run), f"--trainer.callbacks+={signal_callback}"]
    assert main(["fit", *common, *stop]) == 143  # SIGTERM's conventional exit status
    stopped = torch.load(interrupted_run / "checkpoints" / "interrupted.ckpt", weights_only=True)
    assert stopped["global_step"] == stop_step  # stopped right after that batch, inside an epoch
    assert main(["fit", *common, "--trainer.default_root_dir", str(interrupted_run), "--ckpt_path", "last"]) == 0
    assert main(["fit", *common, "--trainer.default_root_dir", str(straight_run)]) == 0

    resumed = torch.load(interrupted_run / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(straight_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == reference["global_step"] > stop_step
    for key, weight in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], weight, rtol=1e-5, atol=1e-6, msg=key)
