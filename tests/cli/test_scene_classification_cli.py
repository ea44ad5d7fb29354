"""Scene classification through the real CLI on tiny class folders: fit, test, export, predict,
leaderboard, and one-line errors."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lightning_app import main
from tests.conftest import REPO
from tests.data.test_scene_folders import write_class_folders

CONFIG = str(REPO / "tests" / "conf" / "scene_classification_tiny.yaml")


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("scenes") / "AID", {"beach": 8, "forest": 8, "river": 8})


def _common(run: Path, root: Path) -> list[str]:
    return ["--config", CONFIG, "--data.init_args.root", str(root), "--trainer.default_root_dir", str(run)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, dataset) -> Path:
    run = tmp_path_factory.mktemp("run") / "afmnet"
    assert cli("fit", *_common(run, dataset)) == 0
    return run


def test_fit_leaves_checkpoints_and_labelled_examples(trained_run):
    names = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    assert list(trained_run.glob("lightning_logs/version_0/examples/val_examples_epoch000.png"))


def test_test_reports_oa_aa_kappa_per_class_accuracy_and_a_confusion_matrix(trained_run, dataset, capsys):
    assert cli("test", *_common(trained_run, dataset), "--ckpt_path", "best") == 0
    out = capsys.readouterr().out
    for name in ("test_oa", "test_aa", "test_kappa", "test_class_accuracy/beach", "test_class_accuracy/river"):
        assert name in out
    assert list(trained_run.glob("lightning_logs/version_*/examples/test_confusion_matrix_epoch*.png"))


def test_export_runs_in_onnxruntime_with_a_dynamic_batch(trained_run, dataset, tmp_path, capsys):
    path = tmp_path / "afmnet.onnx"
    assert cli("export", *_common(trained_run, dataset), "--ckpt_path", "best", "--output", str(path)) == 0
    assert "max |difference|" in capsys.readouterr().out
    session = ort.InferenceSession(str(path))
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    (probs,) = session.run(None, {"image": np.random.rand(5, 3, 32, 32).astype(np.float32)})
    assert probs.shape == (5, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_predict_writes_one_row_per_image(trained_run, dataset, tmp_path):
    out = tmp_path / "predicted"
    args = [*_common(trained_run, dataset), "--ckpt_path", "best", "--data.init_args.predict_dir", str(dataset / "river")]
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 0
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "name,class,probability" and len(rows) == 1 + 8
    assert {row.split(",")[1] for row in rows[1:]} <= {"beach", "forest", "river"}
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 2  # never overwrites


def test_leaderboard_scores_the_colour_histogram_baseline_once_on_the_same_split(trained_run, tmp_path):
    board = tmp_path / "board"
    assert cli("leaderboard", "--runs", str(trained_run), str(trained_run), "--output", str(board)) == 0
    rows = json.loads((board / "scene_classification.json").read_text())["rows"]
    assert sorted(row["method"] for row in rows) == ["AFM-Net", "AFM-Net", "colour histogram 1-NN"]
    assert {row["dataset"] for row in rows} == {"AID (train 50%, seed 0)"}
    baseline = next(row for row in rows if row["checkpoint"] is None)
    assert set(baseline["metrics"]) == {"test_oa", "test_aa", "test_kappa"}
    assert baseline["metrics"]["test_oa"] == pytest.approx(1.0)  # the fixture's classes differ in colour
    assert "confusion matrix" in (board / "report.html").read_text()


def test_wrong_class_count_is_a_one_line_error(dataset, tmp_path, capsys):
    args = _common(tmp_path / "wrong", dataset)
    assert cli("fit", *args, "--model.init_args.num_classes", "5") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the dataset has 3 classes but the model is configured for 5" in err


def test_empty_class_folder_is_a_one_line_error_naming_it(dataset, tmp_path, capsys):
    broken = write_class_folders(tmp_path / "broken", {"beach": 4, "forest": 4})
    (broken / "lake").mkdir()
    assert cli("fit", *_common(tmp_path / "run", broken), "--model.init_args.num_classes", "3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{broken / 'lake'}: class folder holds no images" in err
