"""The real CLI end to end on tiny data: fit, resume, test, predict, export, leaderboard, errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lightning_app import main
from tests.conftest import REPO, browser_dom, write_pairs

CONFIG = str(REPO / "tests" / "conf" / "low_light_tiny.yaml")


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, lol_v1_root) -> Path:
    run = tmp_path_factory.mktemp("run") / "iagc"
    assert cli("fit", "--config", CONFIG, "--data.init_args.root", str(lol_v1_root), "--trainer.default_root_dir", str(run)) == 0
    return run


def _common(run: Path, root: Path) -> list[str]:
    return ["--config", CONFIG, "--data.init_args.root", str(root), "--trainer.default_root_dir", str(run)]


def test_fit_leaves_last_and_best_checkpoints_and_example_images(trained_run):
    names = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    assert list(trained_run.glob("lightning_logs/version_0/examples/val_examples_epoch000.png"))


def test_fit_refuses_to_overwrite_an_earlier_run(trained_run, lol_v1_root, capsys):
    assert cli("fit", *_common(trained_run, lol_v1_root)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds checkpoints of an earlier run" in err and len(err.splitlines()) == 1


def test_resume_with_ckpt_path_last_continues_the_step_count(tmp_path, lol_v1_root):
    run = tmp_path / "resume"
    assert cli("fit", *_common(run, lol_v1_root)) == 0
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert cli("fit", *_common(run, lol_v1_root), "--trainer.max_epochs", "2", "--ckpt_path", "last") == 0
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (first["epoch"], second["epoch"]) == (0, 1)
    assert second["global_step"] == 2 * first["global_step"]


def test_bf16_mixed_precision_fits_and_tests_on_cpu(tmp_path, lol_v1_root, capsys):
    run = tmp_path / "bf16"
    bf16 = ["--trainer.precision", "bf16-mixed"]
    assert cli("fit", *_common(run, lol_v1_root), *bf16) == 0
    assert cli("test", *_common(run, lol_v1_root), *bf16, "--ckpt_path", "last") == 0
    psnr = float(re.search(r"test_psnr\s+│\s+([-\d.]+)", capsys.readouterr().out).group(1))
    assert 5 < psnr < 60  # a finite, sensible score: no NaN from reduced-precision gamma or SSIM


def test_test_prints_metrics_of_the_best_checkpoint(trained_run, lol_v1_root, capsys):
    assert cli("test", *_common(trained_run, lol_v1_root), "--ckpt_path", "best") == 0
    out = capsys.readouterr().out
    assert "test_psnr" in out and "test_ssim" in out


def test_test_on_another_dataset_in_another_layout(trained_run, tmp_path, capsys):
    write_pairs(tmp_path / "v2" / "Real_captured" / "Test", ["1", "2"], [(24, 30), (21, 33)], "Low", "Normal", "low", "normal")
    assert cli("test", *_common(trained_run, tmp_path / "v2"), "--ckpt_path", "best") == 0
    assert "test_psnr" in capsys.readouterr().out


def test_predict_writes_each_result_under_the_same_name(trained_run, lol_v1_root, tmp_path):
    out = tmp_path / "enhanced"
    inputs = lol_v1_root / "eval15" / "low"
    args = [*_common(trained_run, lol_v1_root), "--ckpt_path", "best", "--data.init_args.predict_dir", str(inputs)]
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs.iterdir())
    from PIL import Image

    for path in out.iterdir():
        assert Image.open(path).size == Image.open(inputs / path.name).size
    # a second run must not overwrite the first one's files
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out)) == 2


def test_predict_that_fails_midway_leaves_no_outputs(trained_run, lol_v1_root, tmp_path, capsys):
    inputs = tmp_path / "photos"
    inputs.mkdir()
    for path in sorted((lol_v1_root / "eval15" / "low").iterdir()):
        (inputs / path.name).write_bytes(path.read_bytes())
    broken = inputs / "z_truncated.png"
    broken.write_bytes((inputs / "t0.png").read_bytes()[:200])  # read last, after the others were written
    out = tmp_path / "enhanced"
    args = [*_common(trained_run, lol_v1_root), "--ckpt_path", "best", "--data.init_args.predict_dir", str(inputs)]
    assert cli("predict", *args, "--data.init_args.predict_output_dir", str(out), "--data.init_args.eval_batch_size", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0]
    assert not out.exists() or not list(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no staging folder left either


def test_export_runs_in_onnxruntime_at_another_size(trained_run, lol_v1_root, tmp_path, capsys):
    onnx_path = tmp_path / "iagc.onnx"
    assert cli("export", *_common(trained_run, lol_v1_root), "--ckpt_path", "best", "--output", str(onnx_path)) == 0
    assert "max |difference|" in capsys.readouterr().out
    session = ort.InferenceSession(str(onnx_path))
    (output,) = session.run(None, {"image": np.random.rand(3, 3, 29, 70).astype(np.float32)})
    assert output.shape == (3, 3, 29, 70) and output.min() >= 0 and output.max() <= 1
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 3, "height", "width"]


def test_leaderboard_writes_markdown_csv_and_json_with_baselines(trained_run, tmp_path):
    out = tmp_path / "board"
    assert cli("leaderboard", "--runs", str(trained_run), "--output", str(out)) == 0
    table = json.loads((out / "low_light.json").read_text())
    methods = [row["method"] for row in table["rows"]]
    assert sorted(methods) == ["CLAHE", "IAGC", "dark input", "global gamma"]
    iagc = next(row for row in table["rows"] if row["method"] == "IAGC")
    assert {"test_psnr", "test_ssim"} <= set(iagc["metrics"]) and iagc["params_M"] > 0 and iagc["latency_ms"] > 0
    assert (out / "low_light.csv").read_text().startswith("task,method,backbone,dataset,split,test_psnr,test_ssim")
    assert "| IAGC |" in (out / "low_light.md").read_text() and (out / "leaderboard.md").exists()
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_leaderboard_report_renders_every_table_and_image_in_chromium(trained_run, tmp_path):
    out = tmp_path / "board"
    assert cli("leaderboard", "--runs", str(trained_run), "--output", str(out)) == 0
    page = (out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page and 'src="http' not in page  # self-contained
    dom = browser_dom(out / "report.html")
    images = int(re.search(r'data-images-ok="(\d+)"', dom).group(1))
    assert images >= 1 and 'data-images-broken="0"' in dom and 'data-tables="1"' in dom
    assert dom.count("<tr") == 1 + 4  # header + IAGC and the three baselines


def test_print_config_lists_the_task_arguments(capsys):
    with pytest.raises(SystemExit) as stop:
        cli("fit", "--config", CONFIG, "--print_config")
    assert stop.value.code == 0
    assert "taylor_order" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["fit", "--config", "no/such.yaml"], "no/such.yaml"),
        (["fit", "--config", CONFIG, "--model.init_args.taylor_ordr", "3"], "taylor_ordr"),
        (["test", "--config", CONFIG, "--data.init_args.root", "/no/such/dataset"], "/no/such/dataset: dataset root does not exist"),
        (["export", "--config", CONFIG, "--ckpt_path", "/no/such.ckpt"], "/no/such.ckpt"),
    ],
)
def test_bad_input_gives_one_line_error_and_nonzero_exit(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "lightning_app.py"), *args, "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


class _Payload:
    """Stands for any pickled object in a checkpoint: unpickling it could run code."""


@pytest.mark.parametrize("subcommand", ["test", "export", "fit"])
def test_checkpoint_carrying_a_pickled_object_is_refused(subcommand, trained_run, lol_v1_root, tmp_path, capsys):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = _Payload()
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save(checkpoint, unsafe)
    run = tmp_path / "run"
    assert cli(subcommand, *_common(run, lol_v1_root), "--ckpt_path", str(unsafe)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(unsafe) in err[0] and "refused to load" in err[0]
    assert not run.exists() or not list(run.rglob("*.ckpt"))  # nothing ran
