"""The leaderboard: evaluate trained runs and classical baselines on the same test split.

For every run (a run directory or a ``.ckpt``) the checkpoint alone rebuilds the task and its
datamodule (both are saved in it), the test split is scored, and each of the task's
``baselines()`` is scored on the very same batches. One table per task is written as Markdown,
CSV and JSON; every file goes to a temporary name first and is renamed when complete, so an
interrupted run never leaves a half-written table.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pytorch_lightning as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.base import BaseDataModule
from tasks.base import BaseTask, batch_size_of
from tasks.checkpoints import CheckpointError, find_best_checkpoint, load_checkpoint

LATENCY_BATCHES = 5


def resolve_run(spec: str | Path) -> Path:
    """A ``.ckpt`` file as given, or the best checkpoint of a run directory."""
    spec = Path(spec)
    return spec if spec.is_file() else find_best_checkpoint(spec)


def load_run(checkpoint: Path) -> tuple[BaseTask, BaseDataModule]:
    """Rebuild task and datamodule from a checkpoint written by the CLI (it stores both)."""
    state = load_checkpoint(checkpoint)  # refuses unsafe files with a clear message
    task_class = imported_subclass(BaseTask, state.get("hyper_parameters", {}).get("_class_path"), checkpoint)
    data_class = imported_subclass(
        BaseDataModule, state.get("datamodule_hyper_parameters", {}).get("_class_path"), checkpoint
    )
    task = task_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    datamodule = data_class.load_from_checkpoint(checkpoint, weights_only=True)
    return task.eval(), datamodule


def imported_subclass(base: type, class_path: str | None, checkpoint: Path) -> type:
    """The already-imported subclass of ``base`` named ``class_path`` (nothing is imported by name)."""
    stack, seen = [base], {}
    while stack:
        cls = stack.pop()
        seen[f"{cls.__module__}.{cls.__qualname__}"] = cls
        stack.extend(cls.__subclasses__())
    if class_path not in seen or seen[class_path] is base:
        raise CheckpointError(f"{checkpoint}: names no known {base.__name__} subclass ({class_path!r}); was it written by this CLI?")
    return seen[class_path]


def time_per_sample(predict: Callable[[dict], Any], batches: list[dict]) -> float:
    """Median milliseconds per sample over ``batches``, after one warm-up call."""
    with torch.no_grad():
        predict(batches[0])
        times = []
        for batch in batches:
            start = time.perf_counter()
            predict(batch)
            times.append((time.perf_counter() - start) * 1000 / batch_size_of(batch))
    return statistics.median(times)


def count_gflops(task: BaseTask, batch: dict) -> float:
    """Forward GFLOPs of the inference graph per sample, on a real test batch (so at its size)."""
    inputs = task.inference_inputs(batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        task.inference_module()(*inputs)
    return counter.get_total_flops() / 1e9 / batch_size_of(batch)


def score(task: BaseTask, predict: Callable[[dict], Any], batches: Iterable[dict]) -> dict[str, float]:
    """Test metrics of ``predict`` on ``batches``, with a fresh copy of the task's metrics."""
    metrics = task.configure_metrics().clone(prefix="test_")
    with torch.no_grad():
        for batch in batches:
            task.update_metrics(metrics, predict(batch), batch)
    return {name: float(value) for name, value in metrics.compute().items()}


def evaluate_run(spec: str | Path) -> list[dict[str, Any]]:
    """Rows for one run: the trained method, then each classical baseline on the same split."""
    checkpoint = resolve_run(spec)
    task, datamodule = load_run(checkpoint)
    datamodule.prepare_data()
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    timing = list(itertools.islice(loader, LATENCY_BATCHES))
    common = {"task": task.task_name, "dataset": datamodule.dataset_name, "split": "test"}

    rows = [
        {
            **common,
            "method": task.method_name,
            "backbone": task.backbone_name,
            "metrics": score(task, task.predict_batch, loader),
            "params_M": sum(p.numel() for p in task.inference_module().parameters()) / 1e6,
            "gflops": count_gflops(task, timing[0]),
            "latency_ms": time_per_sample(task.predict_batch, timing),
            "checkpoint": str(checkpoint),
        }
    ]
    for name, baseline in task.baselines().items():
        rows.append(
            {
                **common,
                "method": name,
                "backbone": "-",
                "metrics": score(task, baseline, loader),
                "params_M": 0.0,
                "gflops": None,
                "latency_ms": time_per_sample(baseline, timing),
                "checkpoint": None,
            }
        )
    for row in rows:
        row["primary_metric"] = "test_" + task.monitor.removeprefix("val_")
        row["higher_is_better"] = task.mode == "max"
    return rows


# -- writing -------------------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sorted(rows: list[dict]) -> list[dict]:
    primary, higher = rows[0]["primary_metric"], rows[0]["higher_is_better"]
    return sorted(rows, key=lambda r: r["metrics"].get(primary, float("nan")), reverse=higher)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def to_markdown(task: str, rows: list[dict]) -> str:
    metric_names = list(rows[0]["metrics"])
    primary, higher = rows[0]["primary_metric"], rows[0]["higher_is_better"]
    arrows = {m: ("↑" if higher else "↓") if m == primary else "" for m in metric_names}
    header = ["Method", "Backbone", "Dataset"] + [f"{m.removeprefix('test_')} {arrows[m]}".strip() for m in metric_names]
    header += ["Params (M)", "GFLOPs", "Latency (ms/sample)"]
    lines = [f"## {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _sorted(rows):
        cells = [row["method"], row["backbone"], row["dataset"]] + [_fmt(row["metrics"][m]) for m in metric_names]
        cells += [_fmt(row["params_M"], 3), _fmt(row["gflops"], 3), _fmt(row["latency_ms"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    metric_names = list(rows[0]["metrics"])
    fields = ["task", "method", "backbone", "dataset", "split", *metric_names, "params_M", "gflops", "latency_ms", "checkpoint"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in _sorted(rows):
        flat = {k: v for k, v in row.items() if k in fields}
        writer.writerow({**flat, **row["metrics"]})
    return buffer.getvalue()


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": "cpu",
    }


def write_leaderboard(rows: list[dict], output: str | Path) -> list[Path]:
    """One Markdown, CSV and JSON table per task, plus ``leaderboard.md`` with every task."""
    output = Path(output)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    written = []
    sections = []
    for task, task_rows in sorted(by_task.items()):
        markdown = to_markdown(task, task_rows)
        sections.append(markdown)
        payload = {"task": task, "environment": environment(), "rows": _sorted(task_rows)}
        for suffix, text in (("md", markdown), ("csv", to_csv(task_rows)), ("json", json.dumps(payload, indent=2))):
            path = output / f"{task}.{suffix}"
            write_atomically(path, text)
            written.append(path)
    env = environment()
    note = f"Latency on {env['cpu']} with {env['threads']} threads, torch {env['torch']}.\n"
    index = output / "leaderboard.md"
    write_atomically(index, "# Leaderboard\n\n" + note + "\n" + "\n".join(sections))
    written.append(index)
    return written


def run_leaderboard(runs: list[str], output: str) -> list[Path]:
    """Evaluate every run and write the tables; returns the written paths."""
    rows = [row for spec in runs for row in evaluate_run(spec)]
    return write_leaderboard(rows, output)
