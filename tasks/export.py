"""ONNX export of a task's inference graph, checked in onnxruntime at a second size.

PyTorch's dynamo exporter can silently turn a requested dynamic axis into a constant when the
model specialises on it, so the check runs onnxruntime on ``task.check_input()`` (another batch
and spatial size) and also asserts that the named axes are symbolic in the saved graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from data.atomic_write import write_atomically
from tasks.base import BaseTask


class ExportError(Exception):
    """The exported graph is missing a dynamic axis or disagrees with PyTorch."""


def export_onnx(task: BaseTask, output: str | Path, opset: int = 20) -> float:
    """Write ``task.inference_module()`` to ``output`` and verify it; return the max |difference|.

    The file is written to a temporary name and renamed only after the check passes, so a
    failed or interrupted export never leaves a model behind.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    module = task.inference_module().eval().cpu()
    dims = {label: torch.export.Dim(label, min=size) for label, size in task.dynamic_axis_min.items()}
    dynamic_shapes = {}
    # A task may bound an axis from below (a strided CNN needs a minimum input size); without the
    # bound the exporter meets size guards it cannot prove and falls back to slower tracing.
    minimum = getattr(task, "dynamic_axis_min", {})
    for name, axes in task.dynamic_axes.items():
        dynamic_shapes[name] = {
            axis: dims.setdefault(label, torch.export.Dim(label, min=minimum[label]) if label in minimum else torch.export.Dim(label))
            for axis, label in axes.items()
        }

    def write_checked(tmp: Path) -> float:
        """Export to ``tmp`` and check it; an exception here leaves ``output`` untouched."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                task.example_input(),
                input_names=list(task.input_names),
                output_names=list(task.output_names),
                dynamic_shapes=_by_forward_argument(module, dynamic_shapes),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        program.save(str(tmp))
        _check_dynamic_axes(onnx.load(str(tmp)), task.dynamic_axes)
        max_diff = compare_with_onnxruntime(module, tmp, task.check_input(), list(task.input_names))
        if not max_diff <= task.export_atol:
            raise ExportError(f"{output}: onnxruntime differs from PyTorch by {max_diff:.3g} > {task.export_atol:g}")
        return max_diff

    return write_atomically(output, write_checked)


def compare_with_onnxruntime(module: torch.nn.Module, path: Path, inputs: tuple, names: list[str]) -> float:
    """Largest absolute difference between PyTorch and onnxruntime outputs on ``inputs``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: tensor.cpu().numpy() for name, tensor in zip(names, inputs)}
    ort_outputs = session.run(None, feed)
    with torch.no_grad():
        torch_outputs = module(*inputs)
    if isinstance(torch_outputs, torch.Tensor):
        torch_outputs = (torch_outputs,)
    diffs = []
    for expected, got in zip(torch_outputs, ort_outputs):
        if tuple(expected.shape) != got.shape:
            raise ExportError(f"{path}: onnxruntime output shape {got.shape} != PyTorch {tuple(expected.shape)}")
        diffs.append(float(np.abs(expected.cpu().numpy().astype(np.float64) - got).max(initial=0.0)))
    return max(diffs)


def _by_forward_argument(module: torch.nn.Module, shapes_by_input: dict) -> dict:
    """Key dynamic shapes by the forward's parameter names, in the order of ``input_names``."""
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters if p != "self"]
    return {param: shape for param, shape in zip(params, shapes_by_input.values())}


def _check_dynamic_axes(model: onnx.ModelProto, axes: dict[str, dict[int, str]]) -> None:
    for graph_input in model.graph.input:
        if graph_input.name not in axes:
            continue
        dims = graph_input.type.tensor_type.shape.dim
        for axis, label in axes[graph_input.name].items():
            if not dims[axis].dim_param:
                raise ExportError(
                    f"input {graph_input.name!r} axis {axis} ({label}) was exported as the constant "
                    f"{dims[axis].dim_value}: the model specialises on that size"
                )
