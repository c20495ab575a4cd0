"""K-FAC eigen-basis preconditioning of every layer of a step, in four grouped GEMM launches.

For layer l with gradient matrix ``V = [dW | db]`` (m = d_out rows, n = d_in (+1) columns) and the
eigendecompositions ``A = QA diag(dA) QA^T`` (n x n), ``G = QG diag(dG) QG^T`` (m x m)::

    P = QG [ (QG^T V QA) / (dG dA^T + damping) ] QA^T

computed as four GEMMs with the elementwise divide fused into the epilogue of the second::

    W = V QA                                   (m x n, fp32 scratch)
    T = (QG^T W) / (dG dA^T + damping)         (m x n, fp32 scratch; divide in the GEMM epilogue)
    U = T QA^T                                 (m x n, fp32, reuses W's scratch)
    P = QG U                                   (m x n, written to ``out`` in its dtype)

Each GEMM stage is one launch of one grouped GEMM kernel over *all* layers (layers of any shapes):
a table row per layer holds its operand addresses, sizes, leading dimensions and its first output
tile; a program finds its layer by counting table rows whose first tile is <= its id, then computes
one BLOCK_M x BLOCK_N tile (tiles grouped GROUP_M rows at a time for L2 reuse). Whether each operand
is row- or column-major is a compile-time flag, so the unit stride is a constant the compiler sees
(coalesced loads) and a transposed operand such as ``QG^T`` is the same memory read column-major:
nothing is copied. Layers are ordered by size, largest first, so the long tiles start first. Layers
whose storage dtypes or layouts differ within a stage go to separate launches of the same stage. The
whole plan (all stages) is one host-to-device copy of two small tables; no host synchronisation.

Cost per layer, storage sizes s_v (V), s_q (QA, QG), s_o (out) in bytes:

* flops: 2 m n^2 + 2 m^2 n + 2 m n^2 + 2 m^2 n = 4 m n (m + n) (+ 3 m n for the divide);
* compulsory bytes: m n s_v + 2 (n^2 + m^2) s_q + 4 (m + n) + m n s_o, plus the fp32 intermediates
  W, T, U, each written once and read once: 24 m n. The unfused torch sequence (four matmuls, an
  outer product, an add and a divide per layer) moves 48 m n bytes of fp32 intermediates instead and
  takes 7 launches per layer instead of 4 per step.

Precision: fp32 accumulation; intermediates W, T, U fp32. Both operands 16-bit and equal: the dot
runs in that dtype; otherwise (fp32 eigenvectors, the default, or mixed dtypes) operands are fp32 and
``tl.dot`` uses ``input_precision="ieee"`` (no TF32), matching ``torch.matmul``'s fp32 default.

Layouts and aliasing: ``grads``, ``qa``, ``qg`` with a unit stride in either dimension (row- or
column-major, any leading dimension: slices, transposes) are read in place; others are copied to a
contiguous tensor first. ``da``, ``dg`` may have any stride. ``out`` tensors must be dense (any
dimension order); ``out=grads`` preconditions in place (every layer's V is read by the first stage
before the last stage writes), but ``out`` tensors must not share memory with each other (one ``out``
for two layers) or with ``qa``, ``qg``, ``da``, ``dg`` (ValueError, ``aliasing.check_no_overlap``).
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .aliasing import check_no_overlap
from .checks import check_kernel_dtype, check_same_device
from .dispatch import dot_needs_upcast, is_dense, tl_dtype, use_triton
from .multi_tensor import to_device, per_tensor

EIGEN_CONFIGS = ConfigSpace(
    "eigen_precondition",
    [
        Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for bm, bn in ((32, 32), (64, 64), (64, 128), (128, 64), (128, 128))
        for bk in (16, 32)
        for warps in (4, 8)
        for stages in (2, 3)
    ],
    default=Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
)

# columns of the problem table (int64): addresses, sizes, leading dimensions, eigenvalue strides, first tile
A_PTR, B_PTR, C_PTR, DG_PTR, DA_PTR = (tl.constexpr(c) for c in range(5))
M_COL, N_COL, K_COL, LDA, LDB, LDC, SDG, SDA, FIRST_TILE = (tl.constexpr(c) for c in range(5, 14))
N_COLS = tl.constexpr(14)
#: fewest table rows a program scans (a power of two; fewer compiled variants for small layer counts)
MIN_SCAN = 16


@triton.jit
def _offsets(rows, cols, ld, COL_MAJOR: tl.constexpr):
    """Element offsets of a (rows x cols) tile of a matrix with leading dimension ``ld``."""
    if COL_MAJOR:
        offs = rows[:, None] + cols[None, :] * ld
    else:
        offs = rows[:, None] * ld + cols[None, :]
    return offs


@triton.jit
def _grouped_gemm_kernel(
    table_ptr, damping_ptr, n_problems,
    A_DT: tl.constexpr, B_DT: tl.constexpr, C_DT: tl.constexpr,
    A_COL_MAJOR: tl.constexpr, B_COL_MAJOR: tl.constexpr, C_COL_MAJOR: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DIVIDE: tl.constexpr, MAX_PROBLEMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One tile of ``C = A B`` (divided by ``dG dA^T + damping`` if DIVIDE) of the problem owning it."""
    pid = tl.program_id(0)
    probs = tl.arange(0, MAX_PROBLEMS)
    in_table = probs < n_problems
    firsts = tl.load(table_ptr + probs * N_COLS + FIRST_TILE, mask=in_table, other=0)
    g = tl.sum((in_table & (firsts <= pid)).to(tl.int32), axis=0) - 1
    row = table_ptr + g * N_COLS
    m = tl.load(row + M_COL).to(tl.int32)
    n = tl.load(row + N_COL).to(tl.int32)
    k_size = tl.load(row + K_COL).to(tl.int32)
    local = pid - tl.load(row + FIRST_TILE).to(tl.int32)
    tiles_m = tl.cdiv(m, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(n, BLOCK_N)
    first_m = (local // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    rm = (first_m + (local % per_group) % group_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = ((local % per_group) // group_m) * BLOCK_N + tl.arange(0, BLOCK_N)

    a_ptr = tl.load(row + A_PTR).to(tl.pointer_type(A_DT))
    b_ptr = tl.load(row + B_PTR).to(tl.pointer_type(B_DT))
    lda = tl.load(row + LDA)
    ldb = tl.load(row + LDB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_size, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + _offsets(rm, rk, lda, A_COL_MAJOR),
                    mask=(rm[:, None] < m) & (rk[None, :] < k_size), other=0.0)
        b = tl.load(b_ptr + _offsets(rk, rn, ldb, B_COL_MAJOR),
                    mask=(rk[:, None] < k_size) & (rn[None, :] < n), other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    if DIVIDE:
        dg_ptr = tl.load(row + DG_PTR).to(tl.pointer_type(tl.float32))
        da_ptr = tl.load(row + DA_PTR).to(tl.pointer_type(tl.float32))
        dg = tl.load(dg_ptr + rm * tl.load(row + SDG), mask=rm < m, other=1.0)
        da = tl.load(da_ptr + rn * tl.load(row + SDA), mask=rn < n, other=1.0)
        acc = acc / (dg[:, None] * da[None, :] + tl.load(damping_ptr + g))
    c_ptr = tl.load(row + C_PTR).to(tl.pointer_type(C_DT))
    tl.store(c_ptr + _offsets(rm, rn, tl.load(row + LDC), C_COL_MAJOR), acc.to(C_DT),
             mask=(rm[:, None] < m) & (rn[None, :] < n))


class _Gemm(NamedTuple):
    """``c = a @ b`` for one layer; with ``dg``/``da``, divided by ``dg da^T + damping``."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    dg: torch.Tensor | None = None
    da: torch.Tensor | None = None
    damping: float = 0.0


class _Launch(NamedTuple):
    first_row: int
    n_rows: int
    n_tiles: int
    dtypes: tuple  # of a, b, c
    col_major: tuple  # of a, b, c
    divide: bool


def _layouts(t: torch.Tensor) -> dict[bool, int]:
    """{column-major?: leading dimension} for each layout that addresses the 2-D ``t`` (none, one or both)."""
    (rows, cols), (s0, s1) = t.shape, t.stride()
    found = {}
    if s1 == 1 or cols == 1:
        found[False] = s0
    if s0 == 1 or rows == 1:
        found[True] = s1
    return found


def _plan(stages: Sequence[Sequence[_Gemm]], config: Config, device: torch.device):
    """Problem table, damping table and launches for ``stages`` (run in order), one copy to ``device``."""
    rows, dampings, launches = [], [], []
    for stage in stages:
        groups: dict[tuple, list[tuple[_Gemm, list[int]]]] = {}
        for gemm in stage:
            options = [_layouts(t) for t in (gemm.a, gemm.b, gemm.c)]
            dtypes = (gemm.a.dtype, gemm.b.dtype, gemm.c.dtype)
            # a matrix with a dimension of size 1 fits either layout: join an existing launch if one fits
            keys = [(dtypes, flags) for flags in itertools.product(*options)]
            key = next((k for k in keys if k in groups), keys[0])
            groups.setdefault(key, []).append((gemm, [opt[col] for opt, col in zip(options, key[1])]))
        for (dtypes, col_major), gemms in groups.items():
            first_row, tiles = len(rows), 0
            divide = gemms[0][0].dg is not None  # the same for every GEMM of a stage
            for gemm, lds in gemms:
                (m, k), n = gemm.a.shape, gemm.b.shape[1]
                rows.append([
                    gemm.a.data_ptr(), gemm.b.data_ptr(), gemm.c.data_ptr(),
                    gemm.dg.data_ptr() if divide else 0, gemm.da.data_ptr() if divide else 0,
                    m, n, k, *lds, gemm.dg.stride(0) if divide else 0, gemm.da.stride(0) if divide else 0, tiles,
                ])
                dampings.append(gemm.damping)
                tiles += triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"])
            launches.append(_Launch(first_row, len(gemms), tiles, dtypes, col_major, divide))
    table = to_device(torch.tensor(rows, dtype=torch.int64), device)
    damping = to_device(torch.tensor(dampings, dtype=torch.float32), device)
    return table, damping, launches


def _launch(table: torch.Tensor, damping: torch.Tensor, launch: _Launch, config: Config) -> None:
    a_dt, b_dt, c_dt = launch.dtypes
    a_col, b_col, c_col = launch.col_major
    lo, hi = launch.first_row, launch.first_row + launch.n_rows
    _grouped_gemm_kernel[(launch.n_tiles,)](
        table[lo:hi], damping[lo:hi], launch.n_rows,
        A_DT=tl_dtype(a_dt), B_DT=tl_dtype(b_dt), C_DT=tl_dtype(c_dt),
        A_COL_MAJOR=a_col, B_COL_MAJOR=b_col, C_COL_MAJOR=c_col,
        UPCAST_DOT=a_dt != b_dt or dot_needs_upcast(a_dt) or dot_needs_upcast(b_dt), DIVIDE=launch.divide,
        MAX_PROBLEMS=max(MIN_SCAN, triton.next_power_of_2(launch.n_rows)), **config.launch_kwargs(),
    )


def _check_args(grads, qa, da, qg, dg, damping, out) -> list[float]:
    """Checks shared by both paths; returns one damping per layer."""
    n_layers = len(grads)
    lists = {"qa": qa, "da": da, "qg": qg, "dg": dg}
    if out is not None:
        lists["out"] = out
    for name, seq in lists.items():
        if len(seq) != n_layers:
            raise ValueError(f"{name}: expected one tensor per layer ({n_layers}, as in grads), got {len(seq)}")
    dampings = per_tensor("damping", damping, n_layers)
    for i, lam in enumerate(dampings):
        if not isinstance(lam, numbers.Real) or isinstance(lam, bool):
            raise TypeError(f"damping[{i}]: expected a Python float, got {type(lam).__name__}")
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"damping[{i}]: expected a finite number >= 0, got {lam!r}")
    for i, v in enumerate(grads):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"grads[{i}]: expected a torch.Tensor, got {type(v).__name__}")
        if v.dim() != 2 or v.numel() == 0:
            raise ValueError(f"grads[{i}]: expected a non-empty 2-D (d_out, d_in) matrix, got shape {tuple(v.shape)}")
        m, n = v.shape
        for name, t, shape in (("qa", qa[i], (n, n)), ("da", da[i], (n,)), ("qg", qg[i], (m, m)),
                               ("dg", dg[i], (m,)), ("out", out[i] if out is not None else None, (m, n))):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.shape != shape:
                raise ValueError(f"{name}[{i}]: expected shape {shape} for grads[{i}] of shape {(m, n)}, "
                                 f"got {tuple(t.shape)}")
        for name, t in (("grads", v), ("qa", qa[i]), ("da", da[i]), ("qg", qg[i]), ("dg", dg[i])):
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}]: expected a floating-point tensor, got {t.dtype}")
        if out is not None and not is_dense(out[i]):
            raise ValueError(f"out[{i}]: expected a dense tensor (any dimension order), got strides {out[i].stride()}")
    if n_layers:
        device = grads[0].device
        check_same_device(device, grads=grads, **lists)
    if out is not None:  # grads may be out: stage 1 reads every V before stage 4 writes
        check_no_overlap([("out", out)], [("qa", qa), ("da", da), ("qg", qg), ("dg", dg)], writer="the kernel")
    return dampings


def eigen_precondition(
    grads: Sequence[torch.Tensor],
    qa: Sequence[torch.Tensor],
    da: Sequence[torch.Tensor],
    qg: Sequence[torch.Tensor],
    dg: Sequence[torch.Tensor],
    damping: float | Sequence[float],
    *,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``QG [(QG^T V QA) / (dG dA^T + damping)] QA^T`` for every layer; see the module docstring.

    One entry per layer: ``grads[i]`` the (m, n) gradient matrix V, ``qa[i]`` (n, n) and ``qg[i]``
    (m, m) eigenvectors (columns), ``da[i]`` (n,) and ``dg[i]`` (m,) eigenvalues (fp32 on the Triton
    path), ``damping`` a float >= 0 or one per layer. V, QA, QG are fp32/bf16/fp16 on the Triton path
    (any float dtype on the reference path). Returns the preconditioned gradients: new tensors in each
    ``grads[i]``'s dtype, or ``out`` (dense, any kernel dtype; ``out=grads`` works in place).
    """
    dampings = _check_args(grads, qa, da, qg, dg, damping, out)
    if not grads:
        return []
    device = grads[0].device
    if not use_triton(device):
        return eigen_precondition_reference(grads, qa, da, qg, dg, dampings, out=out)
    for i in range(len(grads)):
        for name, t in (("grads", grads[i]), ("qa", qa[i]), ("qg", qg[i]), ("out", out[i] if out else None)):
            if t is not None:
                check_kernel_dtype(f"{name}[{i}]", t)
        for name, t in (("da", da[i]), ("dg", dg[i])):
            if t.dtype != torch.float32:
                raise TypeError(f"{name}[{i}]: expected float32 eigenvalues, got {t.dtype}")
    grads, qa, qg = ([t if _layouts(t) else t.contiguous() for t in seq] for seq in (grads, qa, qg))
    outs = list(out) if out is not None else [torch.empty(v.shape, dtype=v.dtype, device=device) for v in grads]
    order = sorted(range(len(grads)), key=lambda i: -grads[i].numel() * sum(grads[i].shape))
    sizes = [grads[i].numel() for i in order]
    work = torch.empty(2 * sum(sizes), dtype=torch.float32, device=device)
    w_bufs = [t.view(grads[i].shape) for i, t in zip(order, torch.split(work[:sum(sizes)], sizes))]
    t_bufs = [t.view(grads[i].shape) for i, t in zip(order, torch.split(work[sum(sizes):], sizes))]
    layers = list(zip(order, w_bufs, t_bufs))
    stages = [
        [_Gemm(grads[i], qa[i], w) for i, w, _ in layers],
        [_Gemm(qg[i].T, w, t, dg[i], da[i], float(dampings[i])) for i, w, t in layers],
        [_Gemm(t, qa[i].T, w) for i, w, t in layers],
        [_Gemm(qg[i], w, outs[i]) for i, w, _ in layers],
    ]

    def run(config: Config) -> None:
        table, damping_table, launches = _plan(stages, config, device)
        for launch in launches:
            _launch(table, damping_table, launch, config)

    dtypes = ",".join(sorted({str(t.dtype) for t in (*grads, *qa, *qg, *outs)}))
    bucket = shape_bucket(max(v.shape[0] for v in grads), max(v.shape[1] for v in grads), len(grads))
    EIGEN_CONFIGS.launch(device=device, bucket=bucket, dtype=dtypes, run=run,
                         restore=list(out) if out is not None else [])
    return outs


def eigen_precondition_reference(grads, qa, da, qg, dg, damping, *, out=None) -> list[torch.Tensor]:
    """Plain PyTorch twin of :func:`eigen_precondition` (the unfused sequence; same contract).

    Math in fp32, or float64 when any input of the layer is float64 (the tests' reference).
    """
    dampings = per_tensor("damping", damping, len(grads))
    results = []
    for i, (v, q_a, d_a, q_g, d_g, lam) in enumerate(zip(grads, qa, da, qg, dg, dampings)):
        dtype = torch.float32
        for t in (v, q_a, d_a, q_g, d_g):
            dtype = torch.promote_types(dtype, t.dtype)
        q_a, q_g = q_a.to(dtype), q_g.to(dtype)
        v1 = q_g.T @ v.to(dtype) @ q_a
        v2 = v1 / (torch.outer(d_g.to(dtype), d_a.to(dtype)) + lam)
        p = q_g @ v2 @ q_a.T
        results.append(p.to(v.dtype) if out is None else out[i].copy_(p))
    return results
