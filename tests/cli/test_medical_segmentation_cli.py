"""Medical segmentation through the real CLI on tiny data: fit, test, predict, export, leaderboard."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import onnxruntime as ort
import pytest

from lightning_app import main
from tests.conftest import REPO
from tests.data.synapse_files import write_transunet

CONFIG = str(REPO / "tests" / "conf" / "medical_segmentation_tiny.yaml")
UNET_CONFIG = str(REPO / "tests" / "conf" / "medical_segmentation_unet_tiny.yaml")


def cli(*args: str) -> int:
    return main(list(args))


def _common(config: str, run: Path, root: Path) -> list[str]:
    return ["--config", config, "--data.init_args.root", str(root), "--trainer.default_root_dir", str(run)]


@pytest.fixture(scope="module")
def synapse_root(tmp_path_factory) -> Path:
    return write_transunet(tmp_path_factory.mktemp("synapse") / "Synapse")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synapse_root) -> Path:
    run = tmp_path_factory.mktemp("run") / "transdae"
    assert cli("fit", *_common(CONFIG, run, synapse_root), "--trainer.max_epochs", "2") == 0
    return run


def test_fit_keeps_checkpoints_and_organ_overlays(trained_run):
    names = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    assert list(trained_run.glob("lightning_logs/version_0/examples/val_examples_epoch001.png"))


def test_test_reports_dice_hd95_and_every_organ(trained_run, synapse_root, capsys):
    assert cli("test", *_common(CONFIG, trained_run, synapse_root), "--ckpt_path", "best") == 0
    out = capsys.readouterr().out
    for name in ("test_dice", "test_hd95", "test_dice_aorta", "test_dice_left_kidney", "test_dice_stomach"):
        assert name in out


def test_predict_writes_a_label_volume_per_input(trained_run, synapse_root, tmp_path):
    out = tmp_path / "labels"
    args = _common(CONFIG, trained_run, synapse_root) + ["--ckpt_path", "best"]
    args += ["--data.init_args.predict_dir", str(synapse_root / "test_vol_h5"), "--data.init_args.predict_output_dir", str(out)]
    assert cli("predict", *args) == 0
    for name in ("case0001.npy.h5", "case0002.npy.h5"):
        with h5py.File(out / name) as written:
            labels = written["label"][()]
        assert labels.shape == (5, 24, 20) and labels.max() <= 8


def test_export_runs_in_onnxruntime_at_another_size(trained_run, synapse_root, tmp_path, capsys):
    onnx_path = tmp_path / "transdae.onnx"
    args = _common(CONFIG, trained_run, synapse_root) + ["--ckpt_path", "best", "--output", str(onnx_path)]
    assert cli("export", *args) == 0
    assert "max |difference|" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_path))
    assert session.get_inputs()[0].shape == ["batch", 1, "height", "width"]
    (logits,) = session.run(None, {"image": np.random.rand(3, 1, 29, 70).astype(np.float32)})
    assert logits.shape == (3, 9, 29, 70)


def test_leaderboard_shows_transdae_beside_the_unet_baseline(trained_run, synapse_root, tmp_path):
    unet = tmp_path / "unet"
    assert cli("fit", *_common(UNET_CONFIG, unet, synapse_root)) == 0
    out = tmp_path / "board"
    assert cli("leaderboard", "--runs", str(trained_run), str(unet), "--output", str(out)) == 0
    table = json.loads((out / "medical_segmentation.json").read_text())
    rows = {row["method"]: row for row in table["rows"]}
    assert set(rows) == {"TransDAE", "U-Net"}
    assert rows["U-Net"]["backbone"] == "test_resnet" and rows["TransDAE"]["backbone"] == "transdae_tiny"
    assert {"test_dice", "test_hd95", "test_dice_pancreas"} <= set(rows["TransDAE"]["metrics"])
    header = (out / "medical_segmentation.md").read_text().splitlines()[2]
    assert "dice ↑" in header and "dice_liver" in header and "hd95" in header
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4  # overlays and Dice bars of both runs


def test_a_bad_label_ends_the_run_with_one_line_naming_the_file(tmp_path):
    root = write_transunet(tmp_path / "Synapse")
    bad = root / "test_vol_h5" / "case0002.npy.h5"
    with h5py.File(bad, "r+") as handle:
        handle["label"][0, 0, 0] = 12
    result = subprocess.run(
        [sys.executable, str(REPO / "lightning_app.py"), "test", *_common(CONFIG, tmp_path / "run", root)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "label value 12 is outside the class range 0 .. 8" in errors[0]
    assert "Traceback" not in result.stderr
