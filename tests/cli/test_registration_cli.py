"""VBReg through the real CLI on a tiny generated scene: fit, test, export, predict on two files, leaderboard."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open3d as o3d
import pytest

from lightning_app import main
from tests.conftest import REPO

CONFIG = str(REPO / "tests" / "conf" / "registration_tiny.yaml")


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """This module's own data cache, set before the module-scoped fit and kept for every test.

    The fit writes the built-in scenes there and ``predict`` reads one of them back, so the scene
    is found whichever tests run (``-k predict`` alone) and whatever else the session has cached.
    """
    cache = tmp_path_factory.mktemp("registration_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOCAL_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache) -> Path:
    run = tmp_path_factory.mktemp("run") / "vbreg"
    assert cli("fit", "--config", CONFIG, "--trainer.default_root_dir", str(run)) == 0
    return run


def common(run: Path) -> list[str]:
    return ["--config", CONFIG, "--trainer.default_root_dir", str(run)]


def builtin_test_scene(cache: Path) -> Path:
    (root,) = cache.glob("registration_builtin-*")
    return root / "test" / "room-test-00"


def test_fit_keeps_checkpoints_and_pictures_of_pairs_before_and_after(trained_run):
    names = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    (picture,) = trained_run.glob("lightning_logs/version_0/examples/val_examples_epoch000.png")
    from PIL import Image

    width, height = Image.open(picture).size
    assert width == 3 * 160 + 8 and height >= 160


def test_test_reports_the_registration_metrics(trained_run, capsys):
    assert cli("test", *common(trained_run), "--ckpt_path", "best") == 0
    out = capsys.readouterr().out
    for name in ("test_rr", "test_rre", "test_rte", "test_inlier_precision", "test_inlier_recall", "test_inlier_f1"):
        assert name in out


def test_export_has_a_dynamic_number_of_correspondences(trained_run, tmp_path, capsys):
    onnx_path = tmp_path / "vbreg.onnx"
    assert cli("export", *common(trained_run), "--ckpt_path", "best", "--output", str(onnx_path)) == 0
    assert "max |difference|" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_path))
    assert [i.name for i in session.get_inputs()] == ["corr_pos"]
    assert session.get_inputs()[0].shape == ["batch", "correspondences", 6]
    logits, features, queries, keys = session.run(None, {"corr_pos": np.random.rand(1, 211, 6).astype(np.float32)})
    assert logits.shape == (1, 211) and features.shape[:3] == (1, 2, 211) and queries.shape == keys.shape


def test_predict_writes_the_transform_and_the_aligned_source(trained_run, data_cache, tmp_path, capsys):
    scene = builtin_test_scene(data_cache)
    source, target = scene / "cloud_bin_0.ply", scene / "cloud_bin_1.ply"
    out = tmp_path / "aligned"
    # the short form the README shows (without init_args)
    args = [*common(trained_run), "--ckpt_path", "best", "--data.predict_source", str(source),
            "--data.predict_target", str(target), "--data.predict_output_dir", str(out)]  # fmt: skip
    assert cli("predict", *args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cloud_bin_0_to_cloud_bin_1.ply", "cloud_bin_0_to_cloud_bin_1.txt"]
    transform = np.loadtxt(out / "cloud_bin_0_to_cloud_bin_1.txt")
    assert transform.shape == (4, 4) and np.allclose(transform[3], [0, 0, 0, 1])
    assert np.allclose(transform[:3, :3] @ transform[:3, :3].T, np.eye(3), atol=1e-5)
    original = np.asarray(o3d.io.read_point_cloud(str(source)).points)
    aligned = np.asarray(o3d.io.read_point_cloud(str(out / "cloud_bin_0_to_cloud_bin_1.ply")).points)
    assert np.allclose(aligned, original @ transform[:3, :3].T + transform[:3, 3], atol=1e-4)
    capsys.readouterr()
    assert cli("predict", *args) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    # .pcd in, .pcd out
    for name in ("cloud_bin_0", "cloud_bin_1"):
        o3d.io.write_point_cloud(str(tmp_path / f"{name}.pcd"), o3d.io.read_point_cloud(str(scene / f"{name}.ply")))
    pcd_out = tmp_path / "aligned_pcd"
    pcd_args = [*common(trained_run), "--ckpt_path", "best", "--data.predict_source", str(tmp_path / "cloud_bin_0.pcd"),
                "--data.predict_target", str(tmp_path / "cloud_bin_1.pcd"), "--data.predict_output_dir", str(pcd_out)]  # fmt: skip
    assert cli("predict", *pcd_args) == 0
    assert sorted(p.name for p in pcd_out.iterdir()) == ["cloud_bin_0_to_cloud_bin_1.pcd", "cloud_bin_0_to_cloud_bin_1.txt"]
    # (PCD stores float32, so its FPFH may differ slightly from the float64 PLY's: compare with its own transform)
    pcd_transform = np.loadtxt(pcd_out / "cloud_bin_0_to_cloud_bin_1.txt")
    pcd_original = np.asarray(o3d.io.read_point_cloud(str(tmp_path / "cloud_bin_0.pcd")).points)
    aligned_pcd = np.asarray(o3d.io.read_point_cloud(str(pcd_out / "cloud_bin_0_to_cloud_bin_1.pcd")).points)
    assert np.allclose(aligned_pcd, pcd_original @ pcd_transform[:3, :3].T + pcd_transform[:3, 3], atol=1e-4)


def test_leaderboard_scores_vbreg_beside_ransac_and_fgr(trained_run, tmp_path):
    out = tmp_path / "board"
    assert cli("leaderboard", "--runs", str(trained_run), "--output", str(out)) == 0
    rows = json.loads((out / "registration.json").read_text())["rows"]
    assert sorted(row["method"] for row in rows) == ["FGR (FPFH)", "RANSAC-2k (FPFH)", "RANSAC-2k (K correspondences)", "VBReg"]
    assert all({"test_rr", "test_rre", "test_rte"} <= set(row["metrics"]) for row in rows)
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data.init_args.predict_source", "/no/such.ply", "--data.init_args.predict_target", "/no/such.ply"], "/no/such.ply: point cloud file does not exist"),
        ([], "predict needs the two point clouds to register"),
    ],
)
def test_predict_with_bad_inputs_gives_one_line_error(tmp_path, extra, message, capsys):
    args = ["predict", *common(tmp_path / "run"), "--data.init_args.predict_output_dir", str(tmp_path / "out"), *extra]
    assert cli(*args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
