"""GraphEcho through the real CLI on a tiny built-in set: fit, test, export, predict, leaderboard."""

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest

from lightning_app import main
from tests.conftest import REPO
from tests.data.test_echo_data import write_avi

CONFIG = str(REPO / "tests" / "conf" / "echo_uda_tiny.yaml")


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "graphecho"
    assert cli("fit", "--config", CONFIG, "--trainer.default_root_dir", str(run)) == 0
    return run


def _common(run: Path) -> list[str]:
    return ["--config", CONFIG, "--trainer.default_root_dir", str(run)]


def test_fit_leaves_checkpoints_and_echo_example_images(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").exists()
    assert list(trained_run.glob("lightning_logs/version_0/examples/val_examples_epoch000.png"))


def test_test_reports_pooled_per_structure_and_per_video_dice(trained_run, capsys):
    assert cli("test", *_common(trained_run), "--ckpt_path", "best") == 0
    out = capsys.readouterr().out
    for name in ("test_dice", "test_video_dice", "test_dice_lv", "test_dice_la", "test_dice_ra", "test_dice_rv"):
        assert name in out


def test_export_segments_frames_of_any_batch_and_size_in_onnxruntime(trained_run, tmp_path, capsys):
    path = tmp_path / "graphecho.onnx"
    assert cli("export", *_common(trained_run), "--ckpt_path", "best", "--output", str(path)) == 0
    assert "max |difference|" in capsys.readouterr().out
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape == ["batch", 1, "height", "width"]
    (logits,) = session.run(None, {"image": np.random.rand(5, 1, 40, 56).astype(np.float32)})
    assert logits.shape == (5, 5, 40, 56)


def test_predict_writes_one_label_volume_per_video_at_its_own_size(trained_run, tmp_path):
    videos, out = tmp_path / "videos", tmp_path / "labels"
    videos.mkdir()
    write_avi(videos / "clip.avi", np.random.default_rng(0).integers(0, 255, (5, 48, 40), dtype=np.uint8))
    volume = np.random.default_rng(1).integers(0, 255, (30, 36, 4), dtype=np.uint8)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(videos / "patient7-4_image.nii.gz"))
    args = [*_common(trained_run), "--ckpt_path", "best", "--data.init_args.predict_dir", str(videos)]
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip_label.nii.gz", "patient7-4_label.nii.gz"]
    assert nib.load(str(out / "clip_label.nii.gz")).shape == (48, 40, 5)
    labels = np.asarray(nib.load(str(out / "patient7-4_label.nii.gz")).dataobj)
    assert labels.shape == (30, 36, 4) and labels.max() <= 4
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 2  # never overwrites


def test_leaderboard_row_names_the_method_from_the_config(trained_run, tmp_path):
    out = tmp_path / "board"
    assert cli("leaderboard", "--runs", str(trained_run), "--output", str(out)) == 0
    rows = json.loads((out / "echo_uda.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["GraphEcho"]
    assert rows[0]["dataset"] == "built-in A4C Site_B (test)" and rows[0]["backbone"] == "EchoCNN"
    assert {"test_dice", "test_video_dice", "test_dice_rv"} <= set(rows[0]["metrics"])
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data.init_args.target_format", "echonet", "--data.init_args.target_root", "/no/such/echonet"],
         "/no/such/echonet: dataset root does not exist"),
        (["--data.init_args.structures", "[LV]"], "the data segments ['LV'] but the model ['LV', 'LA', 'RA', 'RV']"),
    ],
)  # fmt: skip
def test_bad_data_is_a_one_line_error(args, message, tmp_path, capsys):
    assert cli("test", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path / "run"), *args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_bf16_mixed_fit_and_test_on_cpu(tmp_path, capsys):
    run = tmp_path / "bf16"
    common = [*_common(run), "--trainer.precision", "bf16-mixed", "--trainer.logger", "false"]
    assert cli("fit", *common) == 0
    assert cli("test", *common, "--ckpt_path", "last") == 0
    dice = [float(v) for v in re.findall(r"test_dice\s+│\s+([-\d.e]+)", capsys.readouterr().out)]
    assert len(dice) == 1 and 0.0 <= dice[0] <= 1.0
