"""The selective scan (backbones.ops.selective_scan) against the loop over time, on CPU.

Every path must give the sequential reference's output, last state and gradients of all inputs
(u, delta, A, B, C, D, z, delta_bias) within 1e-5 relative error in float32, for lengths 1 to 4096.
"Relative" is per tensor: max |got - want| <= 1e-5 * max |want|.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from backbones.ops.selective_scan import (
    EXPORT_MAX_LENGTH,
    selective_scan,
    selective_scan_doubling,
    selective_scan_sequential,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(length, batch=2, channels=4, state=3, groups=None, dtype=torch.float32, seed=0, decay=1.0):
    """Random inputs in the ranges Mamba uses (A < 0; delta around softplus(-2))."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    proj = (batch, groups, state, length) if groups else (batch, state, length)
    x = {
        "u": rand(batch, channels, length),
        "delta": rand(batch, channels, length) * 0.5 - 2.0,
        "A": -torch.rand(channels, state, generator=g, dtype=torch.float64) * 2 * decay - 0.1,
        "B": rand(*proj),
        "C": rand(*proj),
        "D": rand(channels),
        "z": rand(batch, channels, length),
        "delta_bias": rand(channels) * 0.1,
    }
    return {k: v.to(dtype) for k, v in x.items()}


def assert_relative_close(got: dict, want: dict, rtol: float):
    assert got.keys() == want.keys()
    for key in want:
        scale = want[key].abs().max().item()
        error = (got[key].double() - want[key].double()).abs().max().item()
        assert error <= rtol * max(scale, 1e-30), f"{key}: max error {error:.3g} vs scale {scale:.3g}"
        assert torch.isfinite(got[key]).all(), key


def run(fn, inputs, variant, with_last=True, **extra):
    """Output, last state and the gradients of all inputs a variant passes (others stay at their
    defaults) of a random projection of the output and the last state."""
    leaves = {k: inputs[k].clone().requires_grad_() for k in variant["pass"]}
    out, last = fn(**leaves, delta_softplus=variant["softplus"], return_last_state=True, **extra)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum()
    if with_last:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=torch.float64).to(last)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"out": out.detach(), "last": last.detach(), **{f"grad_{k}": v for k, v in zip(leaves, grads)}}


FULL = {"pass": NAMES, "softplus": True}
VARIANTS = {
    "plain": {"pass": ("u", "delta", "A", "B", "C"), "softplus": False},
    "with_D": {"pass": ("u", "delta", "A", "B", "C", "D"), "softplus": False},
    "with_z": {"pass": ("u", "delta", "A", "B", "C", "z"), "softplus": False},
    "bias_softplus": {"pass": ("u", "delta", "A", "B", "C", "delta_bias"), "softplus": True},
    "softplus_only": {"pass": ("u", "delta", "A", "B", "C"), "softplus": True},
    "everything": FULL,
}


def positive_delta(inputs, variant):
    """Without softplus, Mamba's delta is positive: shift the raw values the way softplus would."""
    if not variant["softplus"]:
        inputs = dict(inputs, delta=F.softplus(inputs["delta"]))
    return inputs


# -- the reference itself ------------------------------------------------------------------------


def test_sequential_reference_matches_recurrence_computed_by_hand():
    # one batch, one channel, one state, two steps: every term written out
    u, delta_raw, A, B, C = [1.0, -2.0], [0.3, -0.4], -1.5, [0.7, 2.0], [1.1, -0.5]
    D, z, bias = 0.25, [0.8, -1.2], 0.1
    delta = [math.log1p(math.exp(d + bias)) for d in delta_raw]  # softplus(delta + bias)
    h0 = delta[0] * B[0] * u[0]
    h1 = math.exp(delta[1] * A) * h0 + delta[1] * B[1] * u[1]
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    expected = [(C[0] * h0 + D * u[0]) * silu(z[0]), (C[1] * h1 + D * u[1]) * silu(z[1])]
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out, last = selective_scan_sequential(
        t([[u]]), t([[delta_raw]]), t([[A]]), t([[B]]), t([[C]]), t([D]), t([[z]]), t([bias]),
        delta_softplus=True, return_last_state=True,
    )
    torch.testing.assert_close(out, t([[expected]]), rtol=1e-12, atol=0)
    torch.testing.assert_close(last, t([[[h1]]]), rtol=1e-12, atol=0)


# -- exactness of the suite's scans ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def reference_for_length(length):
    """The float64 loop on the float32 inputs of ``make_inputs(length)`` (shared by both backends)."""
    return run(selective_scan_sequential, {k: v.double() for k, v in make_inputs(length).items()}, FULL)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 1000, 4096])
@pytest.mark.parametrize("backend", ["chunked", "doubling"])
def test_scan_matches_sequential_reference_float32(length, backend):
    want = reference_for_length(length)
    got = run(selective_scan, make_inputs(length), FULL, backend=backend)
    assert got["out"].dtype == torch.float32
    assert_relative_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", ["chunked", "doubling"])
def test_scan_matches_sequential_reference_with_and_without_options(variant, backend):
    inputs = positive_delta(make_inputs(300, seed=3), VARIANTS[variant])
    want = run(selective_scan_sequential, {k: v.double() for k, v in inputs.items()}, VARIANTS[variant])
    got = run(selective_scan, inputs, VARIANTS[variant], backend=backend)
    assert_relative_close(got, want, rtol=1e-5)
    # the float32 reference loop agrees with the float64 one as well: the tolerance is about the scan
    assert_relative_close(run(selective_scan_sequential, inputs, VARIANTS[variant]), want, rtol=1e-5)


@pytest.mark.parametrize("length", [7, 1000])
def test_chunked_scan_matches_reference_in_float64_to_rounding(length):
    inputs = make_inputs(length, dtype=torch.float64, seed=4)
    got = run(selective_scan, inputs, FULL, backend="chunked")
    assert got["out"].dtype == torch.float64
    assert_relative_close(got, run(selective_scan_sequential, inputs, FULL), rtol=1e-11)


@pytest.mark.parametrize("backend", ["chunked", "doubling"])
def test_grouped_projections_match_reference(backend):
    # (batch, groups, state, length): channel d reads group d // (channels // groups)
    inputs = make_inputs(150, channels=6, groups=3, seed=5)
    want = run(selective_scan_sequential, {k: v.double() for k, v in inputs.items()}, FULL)
    assert_relative_close(run(selective_scan, inputs, FULL, backend=backend), want, rtol=1e-5)


def test_grouped_projections_with_one_group_equal_ungrouped():
    x = make_inputs(50, seed=6)
    grouped = dict(x, B=x["B"][:, None], C=x["C"][:, None])
    torch.testing.assert_close(
        selective_scan(**grouped, delta_softplus=True), selective_scan(**x, delta_softplus=True), rtol=0, atol=0
    )


def test_time_invariant_projection_workaround_matches_per_channel_loop():
    # the error message for (channels, state) B suggests expanding it to groups = channels
    x = {k: v.double() for k, v in make_inputs(20, seed=7).items()}
    u, delta, A = x["u"], F.softplus(x["delta"]), x["A"]
    B_const = torch.randn(4, 3, dtype=torch.float64)
    expanded = B_const[None, :, :, None].expand(2, -1, -1, 20)
    got = selective_scan(u, delta, A, expanded, expanded.clone())
    h = torch.zeros(2, 4, 3, dtype=torch.float64)
    want = []
    for t in range(20):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * B_const
        want.append((h * B_const).sum(-1))
    torch.testing.assert_close(got, torch.stack(want, -1), rtol=1e-10, atol=1e-12)


def strong_decay_inputs():
    # cumulative log-decay reaches about -4096 * 3 * 16: exp of it underflows and its inverse
    # overflows, so any cumprod-then-divide scan returns inf or NaN here
    x = make_inputs(4096, seed=8, decay=8.0)
    x["delta"] = torch.full_like(x["delta"], 3.0)  # softplus(3 + bias) ~ 3
    return x


def weak_decay_inputs():
    # decays close to 1: the state integrates the whole sequence, so a wrong carry shows at once
    x = make_inputs(4096, seed=9)
    x["A"] = x["A"] * 1e-3
    return x


@functools.lru_cache(maxsize=None)
def reference_for(case):
    return run(selective_scan_sequential, {k: v.double() for k, v in case().items()}, FULL)


@pytest.mark.parametrize("backend", ["chunked", "doubling"])
def test_strong_decay_over_long_sequences_stays_finite_and_exact(backend):
    x = strong_decay_inputs()
    assert torch.exp(x["A"].max() * 3.0 * 4096).item() == 0.0  # even the weakest total decay underflows
    assert_relative_close(run(selective_scan, x, FULL, backend=backend), reference_for(strong_decay_inputs), 1e-5)


@pytest.mark.parametrize("backend", ["chunked", "doubling"])
def test_weak_decay_carries_state_across_every_chunk(backend):
    x = weak_decay_inputs()
    assert_relative_close(run(selective_scan, x, FULL, backend=backend), reference_for(weak_decay_inputs), 1e-5)


def test_low_precision_inputs_compute_in_float32_and_return_their_dtype():
    x = make_inputs(100, seed=10)
    half = {k: v.to(torch.bfloat16) for k, v in x.items()}
    out = selective_scan(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    want = selective_scan_sequential(**{k: v.float() for k, v in half.items()}, delta_softplus=True)
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)


def test_cpu_autocast_does_not_lower_the_scan_precision():
    x = make_inputs(200, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(**x, delta_softplus=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, selective_scan(**x, delta_softplus=True), rtol=0, atol=0)


def test_empty_sequence_returns_empty_output_and_zero_state():
    x = make_inputs(0)
    out, last = selective_scan(**x, return_last_state=True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 3))


def test_only_requested_gradients_flow_and_match():
    x = make_inputs(64, seed=12)
    u = x["u"].clone().requires_grad_()
    args = [x[k] for k in NAMES[1:5]]
    (grad,) = torch.autograd.grad(selective_scan(u, *args, delta_softplus=True).sum(), [u])
    u_ref = x["u"].clone().requires_grad_()
    (want,) = torch.autograd.grad(selective_scan_sequential(u_ref, *args, delta_softplus=True).sum(), [u_ref])
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_chunked_scan_has_no_loop_over_time_steps():
    # operations dispatched grow like sqrt(length) (chunk positions), not like the length
    calls = {}
    for length in (1024, 4096):
        x = make_inputs(length, batch=1, channels=2, state=2)
        with _CountTorchCalls() as counter:
            selective_scan(**x)
        calls[length] = counter.calls
    assert calls[4096] < 2.5 * calls[1024], calls
    assert calls[4096] < 4096 // 2, calls


# -- argument checking -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        ({"u": torch.zeros(2, 4)}, "u must be"),
        ({"delta": torch.zeros(2, 4, 9)}, "delta must have"),
        ({"A": torch.zeros(5, 3)}, "A must be"),
        ({"A": torch.zeros(4, 3, dtype=torch.complex64)}, "complex A"),
        ({"B": torch.zeros(2, 3, 9)}, "B must be"),
        ({"C": torch.zeros(4, 3)}, "time-invariant C"),
        ({"B": torch.zeros(2, 3, 3, 8), "C": torch.zeros(2, 3, 3, 8)}, "groups dividing"),
        ({"B": torch.zeros(2, 2, 3, 8)}, "same number of groups"),
        ({"D": torch.zeros(3)}, "D must be"),
        ({"delta_bias": torch.zeros(4, 1)}, "delta_bias must be"),
        ({"z": torch.zeros(2, 4, 7)}, "z must have"),
    ],
)
def test_malformed_arguments_raise_a_clear_error(change, message):
    x = dict(make_inputs(8), **change)
    with pytest.raises(ValueError, match=message):
        selective_scan(**x)


def test_unknown_backend_and_kernel_without_cuda_raise():
    x = make_inputs(8)
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**x, backend="fast")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(**x, backend="kernel")


def test_doubling_scan_refuses_lengths_beyond_its_documented_maximum():
    u = torch.zeros(1, 1, EXPORT_MAX_LENGTH + 1)
    with pytest.raises(ValueError, match=f"exact up to {EXPORT_MAX_LENGTH}"):
        selective_scan_doubling(u, u, torch.zeros(1, 1), u[:, None], u[:, None])


# -- ONNX export -----------------------------------------------------------------------------------


class _ScanModule(torch.nn.Module):
    """A scan with its parameters, as a Mamba block calls it."""

    def __init__(self, channels=4, state=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(-torch.rand(channels, state, generator=g) - 0.1)
        self.D = torch.nn.Parameter(torch.randn(channels, generator=g))
        self.delta_bias = torch.nn.Parameter(torch.randn(channels, generator=g) * 0.1)

    def forward(self, u, delta, B, C, z):
        return selective_scan(u, delta, self.A, B, C, self.D, z, self.delta_bias, delta_softplus=True)


def test_onnx_export_has_dynamic_length_and_matches_at_other_lengths(tmp_path):
    import onnx
    import onnxruntime as ort

    module = _ScanModule().eval()

    def example(length, batch=2):
        x = make_inputs(length, batch=batch, seed=length)
        return (x["u"], x["delta"], x["B"], x["C"], x["z"])

    names = ["u", "delta", "B", "C", "z"]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example(100), input_names=names, dynamo=True, verbose=False,
            dynamic_shapes={n: {0: batch, 2: length} for n in names},
        )
    path = tmp_path / "scan.onnx"
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    assert all(i.type.tensor_type.shape.dim[2].dim_param for i in graph.input), "length was specialised"
    assert not {"Loop", "Scan"} & {node.op_type for node in graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length, batch_size in ((1, 1), (37, 3), (1000, 2)):
        inputs = example(length, batch_size)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        with torch.no_grad():
            want = selective_scan_sequential(*inputs[:2], module.A, *inputs[2:4], module.D, inputs[4],
                                             module.delta_bias, delta_softplus=True)
        scale = want.abs().max().item()
        assert np.abs(got - want.numpy()).max() <= 1e-5 * scale, f"length {length}"


# -- CUDA kernel (mamba-ssm) -----------------------------------------------------------------------


def _mamba_ssm_kernel_available() -> bool:
    from backbones.ops.selective_scan import _mamba_kernel

    return torch.cuda.is_available() and _mamba_kernel() is not None


@pytest.mark.skipif(not _mamba_ssm_kernel_available(), reason="needs CUDA and mamba-ssm built with CUDA")
@pytest.mark.parametrize("length", [7, 1000, 4096])
@pytest.mark.parametrize("groups", [None, 2])
def test_mamba_ssm_kernel_agrees_with_chunked_scan_on_cuda(length, groups):
    x = {k: v.cuda() for k, v in make_inputs(length, channels=8, state=16, groups=groups, seed=13).items()}
    # mamba-ssm's kernel does not propagate the last state's gradient (documented): leave it out
    kernel = run(selective_scan, x, FULL, with_last=False, backend="kernel")
    chunked = run(selective_scan, x, FULL, with_last=False, backend="chunked")
    reference = run(selective_scan_sequential, {k: v.double() for k, v in x.items()}, FULL, with_last=False)
    assert kernel["out"].dtype == torch.float32
    assert_relative_close(chunked, reference, rtol=1e-5)
    assert_relative_close(kernel, chunked, rtol=1e-4)
