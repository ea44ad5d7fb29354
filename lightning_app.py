"""The suite's command line: Lightning's fit / validate / test / predict, plus export and leaderboard.

    python lightning_app.py fit --config configs/low_light/iagc_builtin.yaml
    python lightning_app.py fit --config configs/low_light/iagc_builtin.yaml --ckpt_path last   # resume
    python lightning_app.py test --config configs/low_light/iagc_builtin.yaml --ckpt_path best
    python lightning_app.py predict --config ... --ckpt_path best --data.predict_dir photos/ --data.predict_output_dir out/
    python lightning_app.py export --config ... --ckpt_path best [--output model.onnx]
    python lightning_app.py leaderboard --runs runs/low_light/iagc_builtin [more runs] --output runs/leaderboard
    python lightning_app.py demo [--tasks low_light ...] [--all]   # built-in configs: fit, test, export, leaderboard

Any task (a ``tasks.BaseTask`` subclass) and datamodule (a ``data.BaseDataModule`` subclass)
can be chosen in the config; importing ``tasks`` and ``data`` makes them selectable by class name.
Every run keeps its checkpoints in ``<trainer.default_root_dir>/checkpoints``: ``last.ckpt``, the
best by the task's monitored metric, and ``interrupted.ckpt`` when a fit is stopped (SIGTERM or
Ctrl-C), so ``--ckpt_path last`` resumes where it stopped and ``--ckpt_path best`` finds the best.
Bad input ends with one line naming the file and the problem, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # Lightning 2.6 + jsonargparse>=4.49 noise

import pytorch_lightning as pl  # noqa: E402
from jsonargparse import ArgumentError  # noqa: E402
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402
from pytorch_lightning.utilities.exceptions import SIGTERMException  # noqa: E402

import data  # noqa: E402,F401  (registers the datamodules)
import tasks  # noqa: E402,F401  (registers the tasks)
from data.base import BaseDataModule  # noqa: E402
from data.errors import DatasetError  # noqa: E402
from tasks.base import BaseTask  # noqa: E402
from tasks.callbacks import ExactResume, InterruptCheckpoint  # noqa: E402
from tasks.checkpoints import CheckpointError, find_best_checkpoint, find_resume_checkpoint, load_checkpoint  # noqa: E402
from tasks.demo import DemoError, run_demo  # noqa: E402
from tasks.export import ExportError, export_onnx  # noqa: E402


warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
# With an OnExceptionCheckpoint, Lightning treats a fresh ``fit`` as ``ckpt_path="last"`` and warns
# about it; SuiteCLI.before_fit decides between starting and resuming and says so itself.
warnings.filterwarnings("ignore", message=r".*fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings("ignore", message=r".*there is no last checkpoint available")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")  # a resumed run's own
# ExactResume (tasks/callbacks.py) skips the trained batches through the sampler, not a loader state_dict.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable")
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip")  # advertisements for cloud services
)


class RunError(Exception):
    """A command that would overwrite or misuse a run directory."""


USER_ERRORS = (DatasetError, CheckpointError, ExportError, RunError, ArgumentError)


class SuiteTrainer(pl.Trainer):
    """Lightning's Trainer plus the ``export`` subcommand."""

    def export(
        self,
        model: pl.LightningModule,
        datamodule: Optional[pl.LightningDataModule] = None,
        ckpt_path: Optional[str] = None,
        output: Optional[str] = None,
        opset: int = 20,
    ) -> Path:
        """Export the task's inference graph to ONNX and check it against PyTorch in onnxruntime.

        Args:
            model: the task (from the config).
            datamodule: unused; accepted so that one config serves every subcommand.
            ckpt_path: checkpoint whose weights are exported (``best``/``last`` look in the run).
            output: the ``.onnx`` file; defaults to ``<default_root_dir>/<task>.onnx``.
            opset: ONNX opset (18 or later).
        """
        if ckpt_path is None:
            print("export: no --ckpt_path given, exporting untrained weights", file=sys.stderr)
        else:
            model.load_state_dict(load_checkpoint(ckpt_path)["state_dict"])
        path = Path(output) if output else Path(self.default_root_dir) / f"{model.task_name}.onnx"
        max_diff = export_onnx(model, path, opset=opset)
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(model.input_names, model.check_input()))
        print(f"exported {path}; onnxruntime vs PyTorch at {shapes}: max |difference| = {max_diff:.3g} "
              f"(tolerance {model.export_atol:g})")
        return path


class SuiteCLI(LightningCLI):
    """LightningCLI over ``BaseTask`` and ``BaseDataModule`` with the suite's run conventions."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("ckpt_path") == "best" and subcommand != "fit":
            # Lightning knows "best" only within the process that trained; find it in the run folder.
            config.ckpt_path = str(find_best_checkpoint(self._run_dir(config)))
        elif config.get("ckpt_path") == "last":
            # Resolved here, as Lightning would (the newest of last.ckpt and interrupted.ckpt), so
            # that the file it restores is the one checked below; none yet means a fresh start.
            newest = find_resume_checkpoint(self._run_dir(config))
            config.ckpt_path = None if newest is None and subcommand == "fit" else str(newest or "last")
            if newest is None and subcommand == "fit":
                print(f"no checkpoint in {self._run_dir(config) / 'checkpoints'} yet: starting a new run", file=sys.stderr)
        if config.get("ckpt_path") not in (None, "last", "hpc", "registry"):
            load_checkpoint(config.ckpt_path)  # refuses pickled objects and names the file
        if "weights_only" in config and config.get("weights_only") is None:
            config.weights_only = True  # Lightning's own restore: tensors and plain values only
        self._resumes = subcommand == "fit" and config.get("ckpt_path") is not None
        self._model_options = model_options(sys.argv[1:] if args is None else args)

    def before_instantiate_classes(self) -> None:
        """Lightning replaces the model's arguments with those stored in ``--ckpt_path``'s checkpoint
        (it knows the architecture that was trained); ``--model`` options given on the command line
        win again over them, so ``test --ckpt_path best --model.test_votes 0`` does what it says."""
        subcommand = self.config.get("subcommand")
        if subcommand and self._model_options and self.config[subcommand].get("ckpt_path"):
            self.config = self.parser.parse_args([subcommand, *self._model_options], namespace=self.config)

    @staticmethod
    def _run_dir(config) -> Path:
        return Path(config.trainer.default_root_dir or "runs/default")

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """Add the run's checkpoint callbacks unless the config brings its own ModelCheckpoint,
        and always the callback that makes training reproducible across interruptions."""
        config = self._get(self.config_init, "trainer", default={})
        run_dir = Path(config.get("default_root_dir") or "runs/default")
        kwargs.setdefault("default_root_dir", str(run_dir))
        configured = config.get("callbacks") or []
        extra = [] if any(isinstance(c, ExactResume) for c in configured) else [ExactResume()]
        if not any(isinstance(c, ModelCheckpoint) for c in configured) and config.get("enable_checkpointing") is not False:
            folder = str(run_dir / "checkpoints")
            extra += [
                ModelCheckpoint(
                    dirpath=folder,
                    filename="best-epoch{epoch:03d}-step{step}",
                    auto_insert_metric_name=False,
                    monitor=self.model.monitor,
                    mode=self.model.mode,
                ),
                # Lightning's save_last writes last.ckpt only when the best also changes; a second
                # checkpoint without a monitor keeps last.ckpt at the end of every epoch instead.
                ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False),
                InterruptCheckpoint(dirpath=folder, filename="interrupted"),
            ]
            if config.get("logger") is not False:
                extra.append(LearningRateMonitor(logging_interval="step"))
        kwargs["callbacks"] = list(configured) + extra
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Refuse to start afresh over an earlier run's checkpoints (they would be overwritten);
        ``--ckpt_path last`` in a folder with no checkpoint yet starts a new run (see
        ``parse_arguments``), so one command both starts and resumes."""
        folder = Path(self.trainer.default_root_dir) / "checkpoints"
        if not self._resumes and folder.is_dir() and any(folder.glob("*.ckpt")):
            raise RunError(
                f"{folder}: holds checkpoints of an earlier run; resume with --ckpt_path last, "
                "or start afresh with another --trainer.default_root_dir"
            )


def model_options(args) -> list[str]:
    """The ``--model...`` options (with their values) of a command line; [] for a dict or Namespace."""
    if not isinstance(args, (list, tuple)):
        return []
    chosen, tokens = [], list(args)
    for i, token in enumerate(tokens):
        name = token.split("=", 1)[0]
        if name == "--model" or name.startswith("--model."):
            chosen += [token] if "=" in token else tokens[i : i + 2]
    return chosen


def leaderboard(argv: list[str]) -> None:
    """``leaderboard --runs RUN [RUN ...] --output DIR``: score runs and baselines, write tables."""
    from tasks.leaderboard import run_leaderboard

    parser = argparse.ArgumentParser(
        prog="lightning_app.py leaderboard",
        description="Evaluate runs (run folders or .ckpt files) and classical baselines on their test split.",
    )
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (trainer.default_root_dir) or .ckpt files")
    parser.add_argument("--output", default="runs/leaderboard", help="folder for <task>.md/.csv/.json and leaderboard.md")
    args = parser.parse_args(argv)
    written = run_leaderboard(args.runs, args.output)
    print((Path(args.output) / "leaderboard.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))


def demo(argv: list[str]) -> None:
    """``demo [--tasks TASK ...] [--all] [--output DIR]``: built-in configs end to end, then the leaderboard."""
    parser = argparse.ArgumentParser(
        prog="lightning_app.py demo",
        description="Fit, test and export each task's main built-in config, then write the leaderboard.",
    )
    parser.add_argument("--tasks", nargs="+", help="task folders under configs/ to run (default: all)")
    parser.add_argument("--all", action="store_true", help="every configs/<task>/*_builtin.yaml, comparisons included")
    parser.add_argument("--output", default="runs/leaderboard", help="folder for the leaderboard and its report")
    args = parser.parse_args(argv)
    run_demo(args.tasks, args.output, everything=args.all)


def one_line(error: BaseException) -> str:
    """The message of an error as a single line (a DataLoader worker wraps it in a traceback)."""
    text = str(error).strip()
    if "Problem with given class_path" in text:  # jsonargparse lists every union member; keep ours
        text = "Problem with given class_path" + text.split("Problem with given class_path", 1)[1].split(" - Expected a <class 'NoneType'>")[0]
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the original message
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def main(args: Optional[list[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 on success)."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] == "leaderboard":
            leaderboard(argv[1:])
        elif argv and argv[0] == "demo":
            demo(argv[1:])
        else:
            SuiteCLI(
                BaseTask,
                BaseDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                trainer_class=SuiteTrainer,
                seed_everything_default=0,
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in SuiteCLI.subcommands()}},
                args=None if args is None else argv,
            )
    except (SIGTERMException, KeyboardInterrupt) as error:  # InterruptCheckpoint saved the state
        print("stopped: resume with the same command and --ckpt_path last", file=sys.stderr)
        return 143 if isinstance(error, SIGTERMException) else 130
    except DemoError as error:  # names the failed step's log and shows its last lines
        print(f"error: {error}", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        if os.environ.get("GLOCAL_TRACEBACK"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
