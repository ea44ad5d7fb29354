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
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pytorch_lightning as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from data.atomic_write import write_text_atomically
from data.base import BaseDataModule
from tasks.base import BaseTask, batch_size_of, stack_panels
from tasks.checkpoints import CheckpointError, find_best_checkpoint, load_checkpoint
from tasks.report import render_report

LATENCY_BATCHES = 5
REPORT_PANELS = 3  # test examples pictured per trained run in report.html


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


def score(
    task: BaseTask,
    predict: Callable[[dict], Any],
    batches: Iterable[dict],
    figures: list[tuple[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Test metrics of ``predict`` on ``batches``, with a fresh copy of the task's metrics.

    When ``figures`` is a list, the task's example panels of the first test samples and its
    ``report_figures`` are appended to it, for the HTML report.
    """
    metrics = task.configure_metrics().clone(prefix="test_")
    panels: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in batches:
            prediction = predict(batch)
            task.update_metrics(metrics, prediction, batch)
            if figures is not None and len(panels) < REPORT_PANELS:
                panels.extend(p.detach().cpu() for p in task.example_panels(batch, prediction)[: REPORT_PANELS - len(panels)])
    if figures is not None:
        if panels:
            figures.append((f"{task.method_name}: test examples", stack_panels(panels)))
        figures.extend(task.report_figures(metrics))
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

    figures: list[tuple[str, torch.Tensor]] = []
    rows = [
        {
            **common,
            "method": task.method_name,
            "backbone": task.backbone_name,
            "metrics": score(task, task.predict_batch, loader, figures),
            "params_M": sum(p.numel() for p in task.inference_module().parameters()) / 1e6,
            "gflops": count_gflops(task, timing[0]),
            "latency_ms": time_per_sample(task.predict_batch, timing),
            "checkpoint": str(checkpoint),
            "figures": figures,
        }
    ]
    task.fit_baselines(datamodule)
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


def _sorted(rows: list[dict]) -> list[dict]:
    primary, higher = rows[0]["primary_metric"], rows[0]["higher_is_better"]
    return sorted(rows, key=lambda r: r["metrics"].get(primary, float("nan")), reverse=higher)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Column headers and formatted cells of one task's table, best row first."""
    metric_names = list(rows[0]["metrics"])
    primary, higher = rows[0]["primary_metric"], rows[0]["higher_is_better"]
    arrows = {m: ("↑" if higher else "↓") if m == primary else "" for m in metric_names}
    header = ["Method", "Backbone", "Dataset"] + [f"{m.removeprefix('test_')} {arrows[m]}".strip() for m in metric_names]
    header += ["Params (M)", "GFLOPs", "Latency (ms/sample)"]
    cells = []
    for row in _sorted(rows):
        line = [row["method"], row["backbone"], row["dataset"]] + [_fmt(row["metrics"].get(m)) for m in metric_names]
        cells.append(line + [_fmt(row["params_M"], 3), _fmt(row["gflops"], 3), _fmt(row["latency_ms"], 3)])
    return header, cells


def to_markdown(task: str, rows: list[dict]) -> str:
    header, cells = table(rows)
    lines = [f"## {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


def to_html(rows: list[dict]) -> str:
    """The self-contained HTML report (tables and every trained run's figures)."""
    sections = []
    for task, task_rows in sorted(_by_task(rows).items()):
        header, cells = table(task_rows)
        ordered = _sorted(task_rows)
        figures = [figure for row in ordered for figure in row.get("figures", [])]
        trained = [row["checkpoint"] is not None for row in ordered]
        sections.append({"task": task, "headers": header, "rows": cells, "trained": trained, "figures": figures})
    return render_report(sections, environment())


def _by_task(rows: list[dict]) -> dict[str, list[dict]]:
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    return by_task


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
    """One Markdown, CSV and JSON table per task, plus ``leaderboard.md`` with every task and the
    self-contained ``report.html`` with the tables and pictures."""
    output = Path(output)
    written = []
    sections = []
    for task, task_rows in sorted(_by_task(rows).items()):
        markdown = to_markdown(task, task_rows)
        sections.append(markdown)
        plain_rows = [{k: v for k, v in row.items() if k != "figures"} for row in _sorted(task_rows)]
        payload = {"task": task, "environment": environment(), "rows": plain_rows}
        for suffix, text in (("md", markdown), ("csv", to_csv(task_rows)), ("json", json.dumps(payload, indent=2))):
            path = output / f"{task}.{suffix}"
            write_text_atomically(path, text)
            written.append(path)
    env = environment()
    note = f"Latency on {env['cpu']} with {env['threads']} threads, torch {env['torch']}.\n"
    index = output / "leaderboard.md"
    write_text_atomically(index, "# Leaderboard\n\n" + note + "\n" + "\n".join(sections))
    written.append(index)
    report = output / "report.html"
    write_text_atomically(report, to_html(rows))
    written.append(report)
    return written


def run_leaderboard(runs: list[str], output: str) -> list[Path]:
    """Evaluate every run and write the tables; returns the written paths.

    A baseline is listed once per task and dataset, however many runs share that test split.
    """
    rows: list[dict] = []
    baselines_seen: set[tuple[str, str, str]] = set()
    for row in (row for spec in runs for row in evaluate_run(spec)):
        if row["checkpoint"] is None:  # a baseline row: identical for every run on this split
            key = (row["task"], row["method"], row["dataset"])
            if key in baselines_seen:
                continue
            baselines_seen.add(key)
        rows.append(row)
    return write_leaderboard(rows, output)
