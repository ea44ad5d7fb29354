"""The main job: every built-in config end to end, then the leaderboard and its report.

``python lightning_app.py demo [--tasks low_light ...] [--all] [--output runs/leaderboard]`` runs, for
each task's main built-in configs (``MAIN_CONFIGS``: the task's own method on its built-in dataset,
generated on this machine, and what the report's pictures need), or with ``--all`` for every
``configs/<task>/*_builtin.yaml`` (also the comparisons: ablations, baselines trained the same
way, other backbones):

1. ``fit --ckpt_path last`` (starts a run, resumes an interrupted one, or finds it finished);
2. ``test --ckpt_path best``;
3. ``export --ckpt_path best`` (ONNX, checked in onnxruntime);

then ``leaderboard`` over every run. Each step runs in its own process, so one run's memory is
returned before the next starts; its output goes to ``<run>/demo-<step>.log`` and a Rich progress
display shows where the job is. Running it again resumes each unfinished fit (a finished one
returns in seconds) and runs test and export again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parents[1]
STEPS = ("fit", "test", "export")
# The main job's configs per task: the paper's method, and for echo also the source-only model the
# report's "before adaptation" pictures come from (2.5 minutes). These fit the 60-minute budget on
# two CPU cores; every other built-in config is a comparison that ``--all`` adds.
MAIN_CONFIGS = {
    "echo_uda": ("graphecho_builtin.yaml", "source_only_builtin.yaml"),
    "low_light": ("iagc_builtin.yaml",),
    "medical_segmentation": ("transdae_builtin.yaml",),
    "point_segmentation": ("condaformer_builtin.yaml",),
    "registration": ("vbreg_builtin.yaml",),
    "scene_classification": ("afmnet_builtin.yaml",),
}


class DemoError(Exception):
    """A step of the main job failed; the message names its log file."""


@dataclass(frozen=True)
class BuiltinRun:
    """One built-in config and the run folder its YAML names."""

    task: str
    config: Path
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.task}/{self.config.stem}"


def builtin_runs(
    tasks: list[str] | None = None, configs_dir: Path = REPO / "configs", everything: bool = False
) -> list[BuiltinRun]:
    """Each task's main built-in configs under ``configs_dir`` (every ``*_builtin.yaml`` when
    ``everything``, and for a task without an entry in ``MAIN_CONFIGS``), optionally only for ``tasks``."""
    available = sorted(p.name for p in configs_dir.iterdir() if p.is_dir())
    unknown = sorted(set(tasks or []) - set(available))
    if unknown:
        raise DemoError(f"{configs_dir}: no task folder named {', '.join(unknown)} (tasks: {', '.join(available)})")
    runs = []
    for task in tasks or available:
        configs = sorted((configs_dir / task).glob("*_builtin.yaml"))
        main = [configs_dir / task / name for name in MAIN_CONFIGS.get(task, ())]
        if not everything and set(main) & set(configs):
            configs = [config for config in main if config in configs]
        for config in configs:
            trainer = (yaml.safe_load(config.read_text()) or {}).get("trainer", {})
            run_dir = trainer.get("default_root_dir")
            if not run_dir:
                raise DemoError(f"{config}: a built-in config must set trainer.default_root_dir")
            runs.append(BuiltinRun(task, config, Path(run_dir)))
    return runs


def step_command(run: BuiltinRun, step: str) -> list[str]:
    ckpt = "last" if step == "fit" else "best"
    return [sys.executable, str(REPO / "lightning_app.py"), step, "--config", str(run.config), "--ckpt_path", ckpt]


def run_step(command: list[str], log: Path) -> float:
    """Run one step with its output in ``log``; returns seconds taken, raises DemoError on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        status = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise DemoError(f"{log}: '{' '.join(command[1:])}' failed with exit status {status}; last lines:\n{tail}")
    return time.perf_counter() - start


def run_demo(
    tasks: list[str] | None,
    output: str,
    console: Console | None = None,
    configs_dir: Path = REPO / "configs",
    everything: bool = False,
) -> list[Path]:
    """Fit, test and export the built-in configs of ``tasks`` (all when None), then rank them."""
    console = console or Console(stderr=True)
    runs = builtin_runs(tasks, configs_dir, everything)
    if not runs:
        raise DemoError("no built-in configs (configs/<task>/*_builtin.yaml) to run")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("main job", total=len(runs) * len(STEPS) + 1)
        for run in runs:
            for step in STEPS:
                progress.update(overall, description=f"{run.name}: {step}")
                seconds = run_step(step_command(run, step), run.run_dir / f"demo-{step}.log")
                console.print(f"{run.name}: {step} done in {seconds:.0f} s")
                progress.advance(overall)
        progress.update(overall, description="leaderboard")
        command = [sys.executable, str(REPO / "lightning_app.py"), "leaderboard", "--output", output, "--runs"]
        run_step(command + [str(run.run_dir) for run in runs], Path(output) / "demo-leaderboard.log")
        progress.advance(overall)
    console.print((Path(output) / "leaderboard.md").read_text(), markup=False, highlight=False)
    return [run.run_dir for run in runs]
