"""ConDaFormer through the real CLI on tiny generated rooms: fit, test with voting, export, predict, leaderboard, errors."""

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from lightning_app import main
from tests.conftest import REPO

CONFIG = str(REPO / "tests" / "conf" / "point_segmentation_tiny.yaml")


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "condaformer"
    with pytest.MonkeyPatch.context() as patch:  # the built-in rooms go to the tests' cache
        patch.setenv("GLOCAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        assert cli("fit", "--config", CONFIG, "--trainer.default_root_dir", str(run)) == 0
    return run


def _common(run: Path) -> list[str]:
    return ["--config", CONFIG, "--trainer.default_root_dir", str(run)]


def test_fit_keeps_checkpoints_and_pictures_a_validation_room(trained_run):
    names = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    (picture,) = trained_run.glob("lightning_logs/version_0/examples/val_examples_epoch000.png")
    from PIL import Image

    image = np.asarray(Image.open(picture))
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0] and image.std() > 10  # input | prediction | truth
    hparams = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["attention"] == "plane"


def test_test_votes_over_samplings_and_reports_every_class_iou(trained_run, capsys):
    assert cli("test", *_common(trained_run), "--ckpt_path", "best") == 0
    out = capsys.readouterr().out
    for name in ("test_miou", "test_macc", "test_allacc", "test_iou_ceiling", "test_iou_floor", "test_iou_clutter"):
        assert name in out
    miou = float(re.search(r"test_miou\s*[│|]\s*([0-9.]+)", out).group(1))
    assert 0.0 <= miou <= 1.0  # one training step: the value itself says little
    assert list(trained_run.glob("lightning_logs/version_*/examples/test_examples_epoch*.png"))


def test_model_options_on_the_command_line_win_over_the_checkpoints(trained_run, tmp_path):
    """Lightning puts the checkpoint's stored arguments over the config; options typed on the
    command line must still win (here test-time voting), and the rest still come from the checkpoint."""
    checkpoint = str(trained_run / "checkpoints" / "last.ckpt")
    stored = torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    assert stored["test_votes"] == 2 and stored["label_smoothing"] == 0.0
    other_config = tmp_path / "other.yaml"  # a config file's value loses to the checkpoint's
    other_config.write_text("model:\n  init_args:\n    label_smoothing: 0.3\n    test_votes: 3\n")
    run = tmp_path / "retest"
    args = ["--config", CONFIG, "--config", str(other_config), "--trainer.default_root_dir", str(run), "--ckpt_path", checkpoint]
    assert cli("test", *args, "--model.init_args.test_votes", "1", "--model.test_rotations=[0.0, 1.0]") == 0
    (saved,) = run.glob("lightning_logs/version_0/config.yaml")
    used = yaml.safe_load(saved.read_text())["model"]["init_args"]
    assert used["test_votes"] == 1 and used["test_rotations"] == [0.0, 1.0]
    assert used["label_smoothing"] == 0.0


def test_export_takes_precomputed_indices_and_any_number_of_points(trained_run, tmp_path, capsys):
    onnx_path = tmp_path / "condaformer.onnx"
    assert cli("export", *_common(trained_run), "--ckpt_path", "best", "--output", str(onnx_path)) == 0
    assert "max |difference|" in capsys.readouterr().out
    from tasks.point_segmentation import PointSegmentation

    checkpoint = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    task = PointSegmentation.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    session = ort.InferenceSession(str(onnx_path))
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["coord", "feat", "neighbours_0"] and session.get_inputs()[0].shape == ["points", 3]
    for inputs in (task.example_input(), task.check_input()):  # two rooms of different sizes
        (logits,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
        with torch.no_grad():
            expected = task.inference_module()(*inputs)
        assert logits.shape == (len(inputs[0]), 13)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-3, rtol=1e-3)


def test_predict_writes_coloured_point_files_and_labels(trained_run, tmp_path):
    from data.builtin_rooms import generate_room, scan_room
    from data.point_cloud import write_point_file

    inputs = tmp_path / "scans"
    inputs.mkdir()
    sizes = {}
    for i, suffix in enumerate((".ply", ".pcd")):
        coord, colour, _ = scan_room(generate_room(np.random.default_rng([i, 3])), 1500, scans=1)
        write_point_file(inputs / f"scan{i}{suffix}", coord, colour / 255.0)
        sizes[f"scan{i}"] = len(coord)
    out = tmp_path / "predicted"
    args = [*_common(trained_run), "--ckpt_path", "best", "--data.init_args.predict_dir", str(inputs)]
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scan0.labels", "scan0.ply", "scan1.labels", "scan1.pcd"]
    import open3d as o3d

    for stem, n in sizes.items():
        labels = np.loadtxt(out / f"{stem}.labels", dtype=int)
        assert labels.shape == (n,) and labels.min() >= 0 and labels.max() < 13
        cloud = o3d.io.read_point_cloud(str(next(out.glob(f"{stem}.p*"))))
        assert len(cloud.points) == n and cloud.has_colors()
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 2  # never overwrites


def test_predict_on_a_truncated_file_fails_with_its_name_and_writes_nothing(trained_run, tmp_path, capsys):
    from data.point_cloud import write_point_file

    inputs = tmp_path / "scans"
    inputs.mkdir()
    coord = np.random.default_rng(0).uniform(0, 3, (800, 3))
    write_point_file(inputs / "a.ply", coord, np.full((800, 3), 0.5))
    write_point_file(inputs / "b.ply", coord, np.full((800, 3), 0.5))
    data = (inputs / "b.ply").read_bytes()
    (inputs / "b.ply").write_bytes(data[: len(data) // 2])
    out = tmp_path / "predicted"
    args = [*_common(trained_run), "--ckpt_path", "best", "--data.init_args.predict_dir", str(inputs)]
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(inputs / "b.ply") in err[0] and "truncated" in err[0]
    assert not out.exists() or not list(out.iterdir())


def test_leaderboard_lists_the_run_with_per_class_iou_and_a_rendered_room(trained_run, tmp_path):
    out = tmp_path / "board"
    assert cli("leaderboard", "--runs", str(trained_run), "--output", str(out)) == 0
    table = json.loads((out / "point_segmentation.json").read_text())
    (row,) = table["rows"]
    assert row["method"] == "ConDaFormer" and row["params_M"] > 0 and row["latency_ms"] > 0
    assert {"test_miou", "test_macc", "test_allacc", "test_iou_chair"} <= set(row["metrics"])
    page = (out / "report.html").read_text()
    assert "IoU per class" in page and page.count("data:image/png;base64,") >= 2


def test_missing_test_area_gives_one_line_error(trained_run, tmp_path, capsys):
    root = tmp_path / "s3dis"
    room = root / "Area_1" / "office_1"
    room.mkdir(parents=True)
    np.save(room / "coord.npy", np.zeros((4, 3), np.float32))
    assert cli("test", *_common(trained_run), "--ckpt_path", "best", "--data.init_args.root", str(root)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Area_5 for the test split" in err[0] and str(root) in err[0]
