"""Selective scan: the input-dependent state-space recurrence of Mamba (S6).

Gu and Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023), Sec. 3.2 and
Algorithm 2. The calling convention and semantics are those of mamba-ssm's ``selective_scan_fn``
(and of its loop reference ``selective_scan_ref``). For batch ``b``, channel ``d``, state ``n``:

    delta  = softplus(delta + delta_bias)                 (bias, then softplus, each only if asked)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      h_{-1} = 0
    y_t    = sum_n C_t[n] * h_t[n]  +  D * u_t
    out_t  = y_t * silu(z_t)                              (only if z is given)

``B`` and ``C`` are (batch, state, length), or grouped (batch, groups, state, length) where channel
``d`` reads group ``d // (channels // groups)`` (as mamba-ssm). Everything is computed in float32
(float64 inputs in float64) and the output is cast back to ``u``'s dtype, like mamba-ssm.

Implementations behind the one function ``selective_scan``:

* **kernel**: CUDA tensors with mamba-ssm's compiled ``selective_scan_cuda`` importable.
* **chunked** (everywhere else): an exact scan with no Python loop over the time steps. The length
  is cut into ``n_chunks`` chunks of ``chunk ~ sqrt(length)`` positions (zero-padded: a padded step
  has delta = 0, so decay 1 and no input, and carries the state unchanged).

  1. Local pass: step through the ``chunk`` positions, every chunk at once, from a zero state;
     this gives each chunk's end state as if it had started from zero. The decays
     ``exp(delta_t * A)`` are computed on the way, once, into a buffer that serves every later pass.
  2. Carry: a chunk's total decay is ``exp(A * sum of its deltas)``; a loop over the ``n_chunks``
     chunks (tiny steps) combines (decay, local end state) pairs into the true state entering each.
  3. Output pass: step through the positions again from the true entering states, contracting
     each state with ``C_t`` as soon as it exists. When a gradient is needed the states are written
     out for the backward; otherwise only the current one is kept.

  That is ``2 * chunk`` vectorised steps of the state size and ``n_chunks`` small ones, O(length)
  work. Only products of decays are ever formed, each in (0, 1] when ``A <= 0`` and
  ``delta >= 0``; nothing divides by a cumulative product or takes differences of cumulative
  log-decays, so strong decay over long sequences neither overflows nor underflows into NaN.
  The backward is written by hand: the adjoint ``g_t = dL/dh_t`` obeys the reverse-time recurrence
  ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` (``a_t = exp(delta_t * A)``), run with the same chunking
  backwards in time (a local pass, a carry, a pass collecting the gradients), reading the saved
  decays and states. Training therefore keeps two (batch, channels, length, state) buffers per call
  until the backward (mambapy keeps at least three); in exchange the backward computes no exponential
  and does not re-run the recurrence, which halves its time (mamba-ssm's CUDA kernel recomputes
  instead; on CPU memory traffic, not arithmetic, is the cost).
* **doubling** (used automatically while exporting with ``torch.onnx.export`` / ``torch.export``):
  the same two levels with both scans done by Hillis-Steele doubling, so the graph has a fixed
  size and a dynamic length: ``log2(EXPORT_CHUNK)`` doublings inside the chunks, then
  ``EXPORT_CHUNK_DOUBLINGS`` doublings across them, then a correction of every position by its
  within-chunk cumulative decay. Longest length: ``EXPORT_MAX_LENGTH`` (131072); longer inputs
  raise outside export (an exported graph cannot check, and would be wrong past it). Its autograd
  backward is correct but slow: it is meant for export and inference.

``selective_scan_sequential`` is the plain loop over time that the tests and the benchmark compare
all of these with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: positions per chunk in the exported (doubling) graph; a power of two
EXPORT_CHUNK = 64
#: doublings across chunks in the exported graph: it is exact up to ``EXPORT_MAX_LENGTH`` positions
EXPORT_CHUNK_DOUBLINGS = 11
EXPORT_MAX_LENGTH = EXPORT_CHUNK * 2**EXPORT_CHUNK_DOUBLINGS

BACKENDS = ("auto", "kernel", "chunked", "doubling")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
):
    """Mamba's selective scan with mamba-ssm's ``selective_scan_fn`` semantics.

    Args:
        u: input, (batch, channels, length).
        delta: step sizes before ``delta_bias``/softplus, (batch, channels, length).
        A: state matrix (diagonal per channel), (channels, state), real.
        B, C: input and output projections, (batch, state, length) or (batch, groups, state, length).
        D: skip connection, (channels,).
        z: gate, (batch, channels, length); the output is multiplied by ``silu(z)``.
        delta_bias: added to ``delta`` before the softplus, (channels,).
        delta_softplus: apply softplus to ``delta`` (after the bias).
        return_last_state: also return the state after the last step, (batch, channels, state),
            in the compute dtype. Unlike mamba-ssm's kernel, the suite's paths propagate its gradient.
        backend: ``"auto"`` (kernel on CUDA with mamba-ssm, doubling while exporting, chunked
            otherwise), or force ``"kernel"``, ``"chunked"`` or ``"doubling"``.

    Returns:
        (batch, channels, length) in ``u``'s dtype, or ``(out, last_state)``.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {BACKENDS}, got {backend!r}")
    exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    if backend == "auto":
        if exporting:
            backend = "doubling"
        elif u.is_cuda and u.dtype != torch.float64 and A.shape[1] <= 256 and _mamba_kernel() is not None:
            backend = "kernel"
        else:
            backend = "chunked"
    if backend == "kernel":
        return _kernel_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(u.device.type, enabled=False):
        u_c, delta_c = u.to(compute), _prepare_delta(delta, delta_bias, delta_softplus, compute)
        A_c, B_c, C_c = A.to(compute), _grouped(B).to(compute), _grouped(C).to(compute)
        if u.shape[-1] == 0:  # nothing to scan
            y, last = u_c.clone(), u_c.new_zeros(*u.shape[:2], A.shape[1])
        elif backend == "doubling":
            y, last = selective_scan_doubling(u_c, delta_c, A_c, B_c, C_c)
        else:
            y, last = _ChunkedScan.apply(u_c, delta_c, A_c, B_c, C_c)
        out = _skip_and_gate(y, u_c, D, z).to(u.dtype)
    return (out, last) if return_last_state else out


def selective_scan_sequential(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """The reference: the recurrence stepped one time position at a time (a Python loop over length).

    Same arguments and result as ``selective_scan``; differentiable by autograd. Slow by design.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(u.device.type, enabled=False):
        u_c, delta_c = u.to(compute), _prepare_delta(delta, delta_bias, delta_softplus, compute)
        A_c = A.to(compute)
        channels = u.shape[1]
        # per-channel projections (batch, channels, state, length): group g serves channels_per_group channels
        B_c = _grouped(B).to(compute).repeat_interleave(channels // _grouped(B).shape[1], dim=1)
        C_c = _grouped(C).to(compute).repeat_interleave(channels // _grouped(C).shape[1], dim=1)
        h = u_c.new_zeros(u.shape[0], channels, A.shape[1])
        ys = []
        # unbind (not indexing) so that the backward stacks the per-step gradients in O(length)
        for delta_t, u_t, B_t, C_t in zip(delta_c.unbind(-1), u_c.unbind(-1), B_c.unbind(-1), C_c.unbind(-1)):
            h = torch.exp(delta_t[..., None] * A_c) * h + (delta_t * u_t)[..., None] * B_t
            ys.append((h * C_t).sum(-1))
        y = torch.stack(ys, dim=-1) if ys else u_c.clone()
        out = _skip_and_gate(y, u_c, D, z).to(u.dtype)
    return (out, h) if return_last_state else out


# -- shared pieces ------------------------------------------------------------------------------


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """One clear error per malformed argument, naming its shape and the expected one."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, channels, length), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (the suite's scan is for real A, as Mamba's)")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"selective_scan: A must be (channels={channels}, state), got shape {tuple(A.shape)}")
    state = A.shape[1]
    groups = []
    for name, proj in (("B", B), ("C", C)):
        if proj.dim() == 2:
            raise ValueError(
                f"selective_scan: time-invariant {name} of shape (channels, state) is not supported; pass it "
                f"per channel as {name}[None, :, :, None].expand({batch}, -1, -1, {length}) (groups = channels)"
            )
        if proj.dim() == 3 and proj.shape != (batch, state, length):
            raise ValueError(
                f"selective_scan: {name} must be (batch, state, length) = {(batch, state, length)} "
                f"or (batch, groups, state, length), got shape {tuple(proj.shape)}"
            )
        if proj.dim() == 4 and (
            proj.shape[0] != batch or proj.shape[2:] != (state, length) or channels % proj.shape[1] != 0
        ):
            raise ValueError(
                f"selective_scan: grouped {name} must be (batch={batch}, groups, state={state}, length={length}) "
                f"with groups dividing channels={channels}, got shape {tuple(proj.shape)}"
            )
        if proj.dim() not in (3, 4):
            raise ValueError(f"selective_scan: {name} must be 3-D or 4-D, got shape {tuple(proj.shape)}")
        groups.append(1 if proj.dim() == 3 else proj.shape[1])
    if groups[0] != groups[1]:
        raise ValueError(
            f"selective_scan: B and C must have the same number of groups, got {groups[0]} and {groups[1]}"
        )
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and vector.shape != (channels,):
            raise ValueError(f"selective_scan: {name} must be (channels,) = ({channels},), got {tuple(vector.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def _prepare_delta(delta, delta_bias, delta_softplus, dtype):
    """delta + delta_bias, then softplus: the order of mamba-ssm's kernel and reference."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _grouped(proj: torch.Tensor) -> torch.Tensor:
    """(batch, state, length) -> (batch, 1, state, length); grouped projections pass through."""
    return proj.unsqueeze(1) if proj.dim() == 3 else proj


def _skip_and_gate(y, u, D, z):
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


# -- chunked scan (CPU, and CUDA without mamba-ssm) ---------------------------------------------


def chunk_size(length: int) -> int:
    """Positions per chunk: about sqrt(length), which balances the two levels' step counts."""
    return max(1, math.ceil(math.sqrt(length)))


def _to_steps(x: torch.Tensor, chunk: int, n_chunks: int) -> torch.Tensor:
    """(batch, *mid, length) -> (chunk, batch, n_chunks, *mid), zero-padded, contiguous.

    Position ``t`` of every chunk is then one contiguous slice ``x[t]``.
    """
    pad = chunk * n_chunks - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    x = x.unflatten(-1, (n_chunks, chunk))  # (batch, *mid, n_chunks, chunk)
    return x.movedim(-1, 0).movedim(-1, 2).contiguous()


def _from_steps(x: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``_to_steps``: (chunk, batch, n_chunks, *mid) -> (batch, *mid, length)."""
    x = x.movedim(2, -1).movedim(0, -1)  # (batch, *mid, n_chunks, chunk)
    return x.flatten(-2)[..., :length]


def _shift(x: torch.Tensor, k: int, dim: int, fill: float) -> torch.Tensor:
    """``out[c] = x[c - k]`` along ``dim`` (``dim >= 0``), ``fill`` where ``c < k``; exportable for any ``k``."""
    source, inside = _shift_index(x, k, dim)
    return torch.where(inside, x.index_select(dim, source), fill)


def _shift_index(x: torch.Tensor, k: int, dim: int):
    """Where ``_shift`` reads from, and the mask of positions that have a source (``c >= k``)."""
    index = torch.arange(x.shape[dim], device=x.device) - k
    return index.clamp(min=0), (index >= 0).view([-1] + [1] * (x.dim() - dim - 1))


def _doubling_scan(decay: torch.Tensor, x: torch.Tensor, dim: int, steps: int):
    """Inclusive scan ``x_c <- decay_c * x_{c-1} + x_c`` along ``dim`` by Hillis-Steele doubling.

    Returns the scanned ``x`` and the inclusive prefix products of ``decay``. Exact for
    ``x.shape[dim] <= 2**steps``; every step shifts by an index, never by a size-dependent slice,
    so ``steps`` may exceed what the length needs (the exported graph relies on it).
    """
    for i in range(steps):
        source, inside = _shift_index(x, 1 << i, dim)
        x = x + torch.where(inside, decay * x.index_select(dim, source), 0.0)
        decay = torch.where(inside, decay * decay.index_select(dim, source), decay)
    return x, decay


class _Steps:
    """The chunked scan's inputs laid out step-major: ``x[t]`` is position ``t`` of every chunk.

    States are (state, H) matrices per (batch, chunk, group) of ``G`` groups of ``H`` channels, so
    the channel axis is the long contiguous one: element-wise updates run along it and the sum
    over the state is a vectorised reduction across rows. Shapes: ``dt`` and ``dtu`` (delta * u)
    are (chunk, batch, n_chunks, G, 1, H); ``B`` and ``C`` are (chunk, batch, n_chunks, G, state, 1);
    ``A`` is (G, state, H).
    """

    def __init__(self, u, delta, A, B, C):
        batch, channels, self.length = u.shape
        groups, state = B.shape[1], A.shape[1]
        self.chunk = chunk_size(self.length)
        self.n_chunks = math.ceil(self.length / self.chunk)
        self.per_group = (groups, channels // groups)
        self.A = A.reshape(*self.per_group, state).mT.contiguous()
        self.dt = self.steps(delta)
        self.dtu = self.steps(delta * u)
        self.B = _to_steps(B, self.chunk, self.n_chunks).unsqueeze(-1)
        self.C = _to_steps(C, self.chunk, self.n_chunks).unsqueeze(-1)

    def steps(self, x):
        """(batch, channels, length) -> (chunk, batch, n_chunks, G, 1, H)."""
        return _to_steps(x.unflatten(1, self.per_group), self.chunk, self.n_chunks).unsqueeze(-2)

    def unsteps(self, x):
        """(chunk, batch, n_chunks, G, 1, H) -> (batch, channels, length)."""
        return _from_steps(x.squeeze(-2), self.length).flatten(1, 2)

    def chunk_decay(self):
        """Each chunk's total decay exp(A * sum of its deltas), in (0, 1] for A <= 0 <= delta."""
        return torch.exp(self.dt.sum(0) * self.A)

    def to_channels(self, state):
        """A (batch, G, state, H) state -> (batch, channels, state), mamba-ssm's layout."""
        return state.mT.flatten(1, 2)


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan with its hand-written backward (see the module docstring).

    Inputs are already in the compute dtype: u, delta (batch, channels, length) with the bias and
    softplus applied; A (channels, state); B, C (batch, groups, state, length).
    Returns y = sum_n C h (batch, channels, length) and the last state (batch, channels, state).

    Memory and speed: the forward writes the decays ``exp(delta_t * A)`` of every step into one
    (chunk, batch, n_chunks, G, state, H) buffer, and, when a gradient is needed, the states into a
    second; both are kept for the backward, which then neither recomputes an exponential nor
    re-runs the recurrence (mambapy keeps at least three such buffers, mamba-ssm's kernel none).
    Each loop step works on one step slice of every chunk, small enough to stay in cache; the
    carries across chunks are loops of ``n_chunks`` tiny steps.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        s = _Steps(u, delta, A, B, C)
        training = any(ctx.needs_input_grad)
        # 1. local pass from a zero state, filling in the decays as it goes
        decays = s.dt.new_empty(s.chunk, *s.dt.shape[1:-2], *s.A.shape[-2:])
        h = decays.new_zeros(decays.shape[1:])
        for t in range(s.chunk):
            decay = torch.mul(s.dt[t], s.A, out=decays[t]).exp_()
            h.mul_(decay).addcmul_(s.dtu[t], s.B[t])
        # 2. carry across chunks: the true state entering every chunk, and the last one
        chunk_decay = s.chunk_decay()
        entering = torch.zeros_like(h)
        for c in range(1, s.n_chunks):
            torch.addcmul(h[:, c - 1], chunk_decay[:, c - 1], entering[:, c - 1], out=entering[:, c])
        last = torch.addcmul(h[:, -1], chunk_decay[:, -1], entering[:, -1])
        # 3. output pass from the entering states, contracting with C_t at once
        states = torch.empty_like(decays) if training else None
        h = entering.clone()
        y = torch.empty_like(s.dt)
        for t in range(s.chunk):
            h = torch.mul(decays[t], h, out=states[t]) if training else h.mul_(decays[t])
            h.addcmul_(s.dtu[t], s.B[t])
            torch.matmul(s.C[t].mT, h, out=y[t])
        if training:
            # the step tensors go through save_for_backward (so saved-tensor hooks see them); ctx
            # keeps only the layout
            ctx.save_for_backward(u, delta, decays, states, entering, chunk_decay, s.A, s.dt, s.dtu, s.B, s.C)
            s.A = s.dt = s.dtu = s.B = s.C = None
            ctx.steps = s
        return s.unsteps(y), s.to_channels(last)

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, decays, states, entering, chunk_decay, *step_tensors = ctx.saved_tensors
        s = ctx.steps
        s.A, s.dt, s.dtu, s.B, s.C = step_tensors
        dy_s = s.steps(dy)
        # 1. what each chunk's adjoints pass to the chunk before when started from zero at its end:
        #    flow_c = a_0 g_0 with g_t = C_t dy_t + a_{t+1} g_{t+1}
        flow = torch.zeros_like(entering)
        for t in reversed(range(s.chunk)):
            flow.addcmul_(dy_s[t], s.C[t]).mul_(decays[t])
        # 2. carry backwards: the true adjoint at every chunk's end; the last state's gradient seeds it
        g = torch.empty_like(entering)
        g[:, -1] = dlast.unflatten(1, s.per_group).mT
        for c in reversed(range(s.n_chunks - 1)):
            torch.addcmul(flow[:, c + 1], chunk_decay[:, c + 1], g[:, c + 1], out=g[:, c])
        # 3. reverse pass from the true adjoints, the gradients of every step on the way
        grad_A = torch.zeros_like(g)
        grad_dt = torch.empty_like(s.dt)  # sum_n A a_t h_{t-1} g_t
        grad_dtu = torch.empty_like(s.dt)  # sum_n B_t g_t
        grad_B = torch.empty_like(s.B)
        grad_C = torch.empty_like(s.C)
        q = torch.empty_like(g)
        for t in reversed(range(s.chunk)):
            g.addcmul_(dy_s[t], s.C[t])
            torch.matmul(states[t], dy_s[t].mT, out=grad_C[t])
            torch.matmul(g, s.dtu[t].mT, out=grad_B[t])
            torch.matmul(s.B[t].mT, g, out=grad_dtu[t])
            g.mul_(decays[t])  # a_t g_t, what reaches step t - 1
            torch.mul(states[t - 1] if t > 0 else entering, g, out=q)  # a_t h_{t-1} g_t
            grad_A.addcmul_(s.dt[t], q)
            torch.sum(q.mul_(s.A), dim=-2, keepdim=True, out=grad_dt[t])

        grad_dtu = s.unsteps(grad_dtu)
        grad_u = delta * grad_dtu
        grad_delta = torch.addcmul(s.unsteps(grad_dt), u, grad_dtu)
        grad_A = grad_A.sum((0, 1)).mT.flatten(0, 1)
        grad_B = _from_steps(grad_B.squeeze(-1), s.length)  # (batch, G, state, length)
        grad_C = _from_steps(grad_C.squeeze(-1), s.length)
        return grad_u, grad_delta, grad_A, grad_B, grad_C


# -- doubling scan (exported graphs) -------------------------------------------------------------


def selective_scan_doubling(u, delta, A, B, C):
    """The scan with a graph whose size does not depend on the length (for ONNX export).

    Same inputs and outputs as ``_ChunkedScan`` (compute dtype, bias and softplus applied); plain
    differentiable torch ops. Exact for lengths up to ``EXPORT_MAX_LENGTH``.
    """
    batch, channels, length = u.shape
    exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    if not exporting and length > EXPORT_MAX_LENGTH:
        raise ValueError(
            f"selective_scan: the doubling (export) scan is exact up to {EXPORT_MAX_LENGTH} positions, got {length}"
        )
    groups, state = B.shape[1], A.shape[1]
    per_group = (groups, channels // groups)
    chunk = EXPORT_CHUNK
    # one or two chunks more than needed: with n_chunks = length // chunk + 2 torch.export can prove
    # n_chunks >= 2 and n_chunks * chunk >= length, so the graph stays dynamic (no specialisation)
    n_chunks = length // chunk + 2

    def blocks(x):  # (batch, *mid, length) -> (batch, n_chunks, chunk, *mid), zero-padded
        # unfold, not reshape: reshape makes torch.export guard on divisibility it cannot prove
        x = F.pad(x, (0, n_chunks * chunk - length)).unfold(-1, chunk, chunk)
        return x.movedim(-2, 1).movedim(-1, 2)

    dt = blocks(delta.unflatten(1, per_group))  # (batch, n_chunks, chunk, G, H)
    dtu = blocks((delta * u).unflatten(1, per_group))
    decay = torch.exp(dt[..., None] * A.reshape(*per_group, state))
    inject = dtu[..., None] * blocks(B).unsqueeze(-2)  # (batch, n_chunks, chunk, G, H, state)
    local, cumulative = _doubling_scan(decay, inject, dim=2, steps=int(math.log2(chunk)))
    ends, _ = _doubling_scan(cumulative[:, :, -1], local[:, :, -1], dim=1, steps=EXPORT_CHUNK_DOUBLINGS)
    entering = _shift(ends, 1, dim=1, fill=0.0)
    h = local + cumulative * entering[:, :, None]
    y = (h * blocks(C).unsqueeze(-2)).sum(-1)  # (batch, n_chunks, chunk, G, H)
    y = y.movedim(2, -1).movedim(1, -2).reshape(batch, channels, n_chunks * chunk)
    # drop the padding by gathering (slicing makes torch.export guard on a bound it cannot prove)
    y = y.index_select(-1, torch.arange(length, device=y.device))
    return y, ends[:, -1].reshape(batch, channels, state)


# -- mamba-ssm's CUDA kernel --------------------------------------------------------------------

_KERNEL: list = []  # cache: [selective_scan_fn or None]


def _mamba_kernel():
    """mamba-ssm's ``selective_scan_fn`` if its compiled CUDA extension imports, else None."""
    if not _KERNEL:
        try:
            from mamba_ssm.ops import selective_scan_interface as interface
        except Exception:  # not installed, or installed without its CUDA build (import fails on old versions)
            interface = None
        has_cuda_build = interface is not None and getattr(interface, "selective_scan_cuda", None) is not None
        _KERNEL.append(interface.selective_scan_fn if has_cuda_build else None)
    return _KERNEL[0]


def _kernel_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Call mamba-ssm's kernel, meeting its dtype rules: u, delta, B, C, z in one of float32,
    float16, bfloat16 (all float32 if they differ); A, D, delta_bias in float32."""
    kernel = _mamba_kernel()
    if kernel is None or not u.is_cuda:
        raise RuntimeError("selective_scan: backend='kernel' needs CUDA tensors and mamba-ssm built with CUDA")
    activations = [x for x in (u, delta, B, C, z) if x is not None]
    dtype = u.dtype if len({x.dtype for x in activations}) == 1 else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.float32
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    to_float = lambda x: None if x is None else x.float()  # noqa: E731
    result = kernel(
        cast(u), cast(delta), A.float(), cast(B), cast(C), to_float(D), cast(z), to_float(delta_bias),
        delta_softplus, return_last_state,
    )
    if return_last_state:
        return result[0].to(u.dtype), result[1]
    return result.to(u.dtype)
