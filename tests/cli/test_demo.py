"""The main job (``lightning_app.py demo``): every built-in config fitted, tested, exported, ranked."""

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from lightning_app import main
from tasks.demo import MAIN_CONFIGS, DemoError, builtin_runs, run_demo
from tests.conftest import REPO

TINY = REPO / "tests" / "conf" / "low_light_tiny.yaml"


def _tiny_configs(folder: Path, run_dir: Path, data_root: Path, **overrides) -> Path:
    """A configs/ tree holding one tiny low-light built-in config."""
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["default_root_dir"] = str(run_dir)
    config["data"]["init_args"]["root"] = str(data_root)
    for key, value in overrides.items():
        config["model"]["init_args"][key] = value
    (folder / "low_light").mkdir(parents=True)
    (folder / "low_light" / "iagc_builtin.yaml").write_text(yaml.safe_dump(config))
    (folder / "low_light" / "iagc_lol_v1.yaml").write_text("not: a built-in config\n")
    return folder


def test_every_builtin_config_of_the_repository_names_its_run_folder():
    runs = builtin_runs(everything=True)
    assert runs and all(run.config.name.endswith("_builtin.yaml") for run in runs)
    assert len({run.run_dir for run in runs}) == len(runs)  # no two configs share a run folder


def test_the_main_job_runs_one_main_config_per_task_and_all_adds_the_comparisons():
    main_runs, every_run = builtin_runs(), builtin_runs(everything=True)
    assert {(run.task, run.config.name) for run in main_runs} == {(task, name) for task, names in MAIN_CONFIGS.items() for name in names}
    assert [run.config.name for run in main_runs if run.task == "echo_uda"] == ["graphecho_builtin.yaml", "source_only_builtin.yaml"]
    assert {run.config for run in main_runs} < {run.config for run in every_run}
    echo = builtin_runs(["echo_uda"], everything=True)
    assert {"graphecho_builtin.yaml", "source_only_builtin.yaml", "target_supervised_builtin.yaml"} <= {
        run.config.name for run in echo
    }


def test_demo_fits_tests_exports_and_ranks_then_reruns_without_training_again(tmp_path, lol_v1_root):
    configs = _tiny_configs(tmp_path / "configs", tmp_path / "run", lol_v1_root)
    board = tmp_path / "board"
    console = Console(file=open(tmp_path / "progress.txt", "w"), width=100)
    run_demo(None, str(board), console=console, configs_dir=configs)

    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "run" / "low_light.onnx").exists()
    rows = json.loads((board / "low_light.json").read_text())["rows"]
    assert {row["method"] for row in rows} == {"IAGC", "dark input", "global gamma", "CLAHE"}
    assert "test_psnr" in (tmp_path / "run" / "demo-test.log").read_text()
    first_step = (tmp_path / "run" / "checkpoints" / "last.ckpt").stat().st_mtime_ns

    run_demo(["low_light"], str(board), console=console, configs_dir=configs)  # nothing left to train
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").stat().st_mtime_ns >= first_step
    assert "starting a new run" not in (tmp_path / "run" / "demo-fit.log").read_text()


def test_a_failing_step_names_its_log_and_shows_its_last_lines(tmp_path, lol_v1_root):
    configs = _tiny_configs(tmp_path / "configs", tmp_path / "run", tmp_path / "no-such-data")
    with pytest.raises(DemoError, match=r"(?s)demo-fit\.log: .* failed with exit status 2;.*dataset root does not exist"):
        run_demo(None, str(tmp_path / "board"), console=Console(quiet=True), configs_dir=configs)


def test_unknown_task_is_a_one_line_error(capsys):
    assert main(["demo", "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "no task folder named no_such_task" in err
