r"""Kronecker-factored preconditioning ``JL [dW | db] JR`` rescaled to the gradient's norm (MKOR).

For layer l with weight gradient ``dW`` (m x k, any strides), optional bias gradient ``db`` (m),
``V = [dW | db]`` (m x n, n = k + 1 with a bias, else k) and symmetric factors ``JL`` (m x m),
``JR`` (n x n)::

    D = JL V JR
    r = ||V||_F / ||D||_F                  (the joint norm of weight and bias gradient)
    [dW | db] <- r D                       if r is finite and > 0 and both squared norms are finite
    [dW | db]    unchanged                 otherwise (r is reported as NaN)

in place. The result does not depend on a positive scalar on ``JL`` or ``JR`` (MKOR stores its
inverse factors normalised, see ``kernels.rank1_inverse``). ``V`` is never concatenated: the GEMM
reads ``dW`` through its strides and ``db`` as the last column.

Launches, per class of layers with equal shapes and dtypes (layers batched on the grid's second axis)::

    left       T = JL V                 (m x n fp32 scratch); programs of the first tile row also
                                        sum V^2 over their column panel (partials, no atomics)
    right      D = T JR                 (m x n fp32 scratch) and sum D^2 per output tile
    norms      r per layer from the partials, reduced in a fixed order
    rescale    dW, db <- r D            (nothing written where r is not usable)

The norm rescale is fused as far as it can be: both norms are produced by the GEMMs' epilogues and
the scale is applied by the pass that writes ``D`` back into ``dW`` and ``db`` (a copy any in-place
``[dW | db]`` layout needs anyway). Results are deterministic, hence identical on every rank.

Cost per layer (storage sizes s_j of the factors, s_g of the gradients, in bytes):

* flops: ``2 m n (m + n)`` (the two GEMMs) + ``O(m n)`` for the norms and the rescale;
* compulsory bytes: ``(m^2 + n^2) s_j + 2 m n s_g`` (V read, result written) plus the fp32
  intermediates T and D, each written once and read once: ``16 m n``.

Precision: fp32 accumulation. A stage whose factor is bf16 runs its GEMM on bf16 operands (the
gradient or T is rounded to bf16; bf16 has fp32's range, so this cannot overflow); fp32 and fp16
factors run fp32 operands with ``input_precision="ieee"`` (fp16 operands could overflow on large
gradients). Under the interpreter bf16 operands are rounded and then multiplied in fp32
(``dispatch.dot_needs_upcast``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .aliasing import check_no_overlap
from .checks import check_kernel_dtype, check_same_device
from .dispatch import dot_needs_upcast, tl_dtype, use_triton
from .multi_tensor import FP32_MAX, REDUCE_BLOCK, to_device

KRONECKER_CONFIGS = ConfigSpace(
    "kronecker_precondition",
    [
        Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
        for bm, bn in ((32, 32), (64, 64), (64, 128), (128, 64), (128, 128))
        for bk in (16, 32, 64)
        for warps in (4, 8)
        for stages in (2, 3)
    ],
    default=Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
)

# columns of a class's layer table (int64)
L_PTR, W_PTR, B_PTR, R_PTR, SW0, SW1, SB, OUT_INDEX, N_COLS = (tl.constexpr(i) for i in range(9))


@triton.jit
def _dot(a, b, acc, BF16: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a b`` for fp32 tiles: on bf16 operands for a bf16 stage (rounded, then multiplied in
    fp32 under the interpreter, whose bf16 dot is wrong), else on fp32 operands without TF32."""
    if BF16:
        a = a.to(tl.bfloat16)
        b = b.to(tl.bfloat16)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _left_kernel(
    table_ptr, t_ptr, pv_ptr, m, k, n,
    L_DT: tl.constexpr, G_DT: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) tile of ``T = JL V``; tile row 0 also writes sum V^2 of its columns."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    row = table_ptr + layer * N_COLS
    tiles_n = tl.cdiv(n, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    l_ptr = tl.load(row + L_PTR).to(tl.pointer_type(L_DT))
    w_ptr = tl.load(row + W_PTR).to(tl.pointer_type(G_DT))
    sw0 = tl.load(row + SW0)
    sw1 = tl.load(row + SW1)
    if HAS_BIAS:
        b_ptr = tl.load(row + B_PTR).to(tl.pointer_type(G_DT))
        sb = tl.load(row + SB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    vsq = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, m, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(l_ptr + rm.to(tl.int64)[:, None] * m + rk[None, :],
                    mask=(rm[:, None] < m) & (rk[None, :] < m), other=0.0).to(tl.float32)
        b = tl.load(w_ptr + rk.to(tl.int64)[:, None] * sw0 + rn[None, :] * sw1,
                    mask=(rk[:, None] < m) & (rn[None, :] < k), other=0.0).to(tl.float32)
        if HAS_BIAS:
            db = tl.load(b_ptr + rk * sb, mask=rk < m, other=0.0).to(tl.float32)
            b = tl.where(rn[None, :] == k, db[:, None], b)
        vsq += b * b
        acc = _dot(a, b, acc, BF16, UPCAST)
    layer_t = t_ptr + layer.to(tl.int64) * m * n
    tl.store(layer_t + rm.to(tl.int64)[:, None] * n + rn[None, :], acc, mask=(rm[:, None] < m) & (rn[None, :] < n))
    if pid_m == 0:
        tl.store(pv_ptr + layer * tiles_n + pid_n, tl.sum(tl.sum(vsq, axis=1), axis=0))


@triton.jit
def _right_kernel(
    table_ptr, t_ptr, d_ptr, pd_ptr, m, n,
    R_DT: tl.constexpr, BF16: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One tile of ``D = T JR`` and its sum of squares."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    row = table_ptr + layer * N_COLS
    tiles_n = tl.cdiv(n, BLOCK_N)
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ptr = tl.load(row + R_PTR).to(tl.pointer_type(R_DT))
    layer_t = t_ptr + layer.to(tl.int64) * m * n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(layer_t + rm.to(tl.int64)[:, None] * n + rk[None, :],
                    mask=(rm[:, None] < m) & (rk[None, :] < n), other=0.0)
        b = tl.load(r_ptr + rk.to(tl.int64)[:, None] * n + rn[None, :],
                    mask=(rk[:, None] < n) & (rn[None, :] < n), other=0.0).to(tl.float32)
        acc = _dot(a, b, acc, BF16, UPCAST)
    mask = (rm[:, None] < m) & (rn[None, :] < n)
    tl.store(d_ptr + layer.to(tl.int64) * m * n + rm.to(tl.int64)[:, None] * n + rn[None, :], acc, mask=mask)
    tl.store(pd_ptr + layer * tl.num_programs(0) + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _norms_kernel(table_ptr, pv_ptr, pd_ptr, ratio_ptr, n_pv, n_pd, RBLOCK: tl.constexpr):
    """``r = ||V|| / ||D||`` of one layer, NaN where the raw gradient is kept."""
    layer = tl.program_id(0)
    sv = tl.zeros([RBLOCK], tl.float32)
    for off in range(0, n_pv, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        sv += tl.load(pv_ptr + layer * n_pv + idx, mask=idx < n_pv, other=0.0)
    sd = tl.zeros([RBLOCK], tl.float32)
    for off in range(0, n_pd, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        sd += tl.load(pd_ptr + layer * n_pd + idx, mask=idx < n_pd, other=0.0)
    v2 = tl.sum(sv, axis=0)
    d2 = tl.sum(sd, axis=0)
    ratio = tl.div_rn(tl.sqrt_rn(v2), tl.sqrt_rn(d2))  # correctly rounded, no flush to zero on the GPU
    ok = (v2 <= FP32_MAX) & (d2 <= FP32_MAX) & (d2 > 0) & (ratio > 0) & (ratio <= FP32_MAX)
    # NaN from its bits: a NaN-valued global constexpr fails triton >= 3.6's "global changed" check (nan != nan)
    nan = tl.full([], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    tl.store(ratio_ptr + tl.load(table_ptr + layer * N_COLS + OUT_INDEX), tl.where(ok, ratio, nan))


@triton.jit
def _rescale_kernel(
    table_ptr, d_ptr, ratio_ptr, m, k, n,
    G_DT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``[dW | db] <- r D`` for one tile (nothing where r is NaN)."""
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    row = table_ptr + layer * N_COLS
    tiles_n = tl.cdiv(n, BLOCK_N)
    col0 = (pid % tiles_n) * BLOCK_N
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = col0 + tl.arange(0, BLOCK_N)
    ratio = tl.load(ratio_ptr + tl.load(row + OUT_INDEX))
    rows = tl.where(ratio <= FP32_MAX, m, 0)  # NaN: keep the raw gradient
    d = tl.load(d_ptr + layer.to(tl.int64) * m * n + rm.to(tl.int64)[:, None] * n + rn[None, :],
                mask=(rm[:, None] < rows) & (rn[None, :] < n), other=0.0) * ratio
    w_ptr = tl.load(row + W_PTR).to(tl.pointer_type(G_DT))
    tl.store(w_ptr + rm.to(tl.int64)[:, None] * tl.load(row + SW0) + rn[None, :] * tl.load(row + SW1),
             d.to(G_DT), mask=(rm[:, None] < rows) & (rn[None, :] < k))
    if HAS_BIAS:
        bias_rows = tl.where((col0 <= k) & (k < col0 + BLOCK_N), rows, 0)
        db = tl.sum(tl.where(rn[None, :] == k, d, 0.0), axis=1)
        b_ptr = tl.load(row + B_PTR).to(tl.pointer_type(G_DT))
        tl.store(b_ptr + rm * tl.load(row + SB), db.to(G_DT), mask=rm < bias_rows)


def _check_args(left, grads, right, biases) -> list:
    """Checks shared by both paths; returns ``biases`` as a list (None entries for no bias)."""
    n_layers = len(grads)
    biases = [None] * n_layers if biases is None else list(biases)
    for name, seq in (("left", left), ("right", right), ("biases", biases)):
        if len(seq) != n_layers:
            raise ValueError(f"{name}: expected one entry per layer ({n_layers}, as in grads), got {len(seq)}")
    for i, (jl, g, jr, b) in enumerate(zip(left, grads, right, biases)):
        for name, t in (("left", jl), ("grads", g), ("right", jr), ("biases", b)):
            if t is None and name == "biases":
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}]: expected a floating-point tensor, got {t.dtype}")
        if g.dim() != 2 or g.numel() == 0:
            raise ValueError(f"grads[{i}]: expected a non-empty 2-D (d_out, d_in) matrix, got shape {tuple(g.shape)}")
        m, n = g.shape[0], g.shape[1] + (b is not None)
        for name, t, shape in (("left", jl, (m, m)), ("right", jr, (n, n)),
                               ("biases", b, (m,) if b is not None else None)):
            if shape is not None and t.shape != shape:
                raise ValueError(f"{name}[{i}]: expected shape {shape} for grads[{i}] of shape {tuple(g.shape)}"
                                 f"{' with a bias' if b is not None else ''}, got {tuple(t.shape)}")
        for name, t in (("left", jl), ("right", jr)):
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}]: expected a contiguous tensor, got strides {t.stride()}")
        if b is not None and b.dtype != g.dtype:
            raise TypeError(f"biases[{i}]: expected the dtype of grads[{i}] ({g.dtype}), got {b.dtype}")
    if n_layers:
        device = grads[0].device
        check_same_device(device, left=left, grads=grads, right=right, biases=biases)
    check_no_overlap([("grads", grads), ("biases", biases)], [("left", left), ("right", right)], writer="the kernel")
    return biases


def kronecker_precondition(
    left: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    right: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``[dW | db] <- (||V|| / ||D||) D`` with ``D = JL [dW | db] JR`` for every layer, in place (module
    docstring). ``grads[i]``: (m, k) weight gradient as a matrix (any strides); ``biases[i]``: (m,) or
    None; ``left[i]``: (m, m) and ``right[i]``: (n, n), n = k + 1 with a bias, contiguous. Triton path:
    fp32/bf16/fp16 (any float dtype on the reference path). Returns the ratios r as an fp32 tensor
    (one per layer, NaN where the raw gradient was kept), without a host synchronisation.
    """
    biases = _check_args(left, grads, right, biases)
    n_layers = len(grads)
    if not n_layers:
        return torch.empty(0, dtype=torch.float32)
    device = grads[0].device
    if not use_triton(device):
        return kronecker_precondition_reference(left, grads, right, biases)
    for i, (jl, g, jr) in enumerate(zip(left, grads, right)):
        for name, t in (("left", jl), ("grads", g), ("right", jr)):
            check_kernel_dtype(f"{name}[{i}]", t)
    classes: dict[tuple, list[int]] = {}
    for i, (jl, g, jr, b) in enumerate(zip(left, grads, right, biases)):
        classes.setdefault((g.shape, b is not None, g.dtype, jl.dtype, jr.dtype), []).append(i)
    ratio = torch.empty(n_layers, dtype=torch.float32, device=device)
    tables = {key: to_device(torch.tensor([[
        left[i].data_ptr(), grads[i].data_ptr(), biases[i].data_ptr() if biases[i] is not None else 0,
        right[i].data_ptr(), grads[i].stride(0), grads[i].stride(1),
        biases[i].stride(0) if biases[i] is not None else 0, i] for i in layers], dtype=torch.int64), device)
        for key, layers in classes.items()}

    def run(config: Config) -> None:
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=config.num_warps)
        for ((m, k), has_bias, g_dt, l_dt, r_dt), layers in classes.items():
            n, count, table = k + has_bias, len(layers), tables[((m, k), has_bias, g_dt, l_dt, r_dt)]
            tiles_n = triton.cdiv(n, bn)
            tiles = triton.cdiv(m, bm) * tiles_n
            t = torch.empty((count, m, n), dtype=torch.float32, device=device)
            d = torch.empty((count, m, n), dtype=torch.float32, device=device)
            pv = torch.empty((count, tiles_n), dtype=torch.float32, device=device)
            pd = torch.empty((count, tiles), dtype=torch.float32, device=device)
            _left_kernel[(tiles, count)](
                table, t, pv, m, k, n, L_DT=tl_dtype(l_dt), G_DT=tl_dtype(g_dt), HAS_BIAS=has_bias,
                BF16=l_dt == torch.bfloat16, UPCAST=dot_needs_upcast(l_dt), BLOCK_K=config["BLOCK_K"],
                num_stages=config.num_stages, **blocks)
            _right_kernel[(tiles, count)](
                table, t, d, pd, m, n, R_DT=tl_dtype(r_dt), BF16=r_dt == torch.bfloat16,
                UPCAST=dot_needs_upcast(r_dt), BLOCK_K=config["BLOCK_K"], num_stages=config.num_stages, **blocks)
            _norms_kernel[(count,)](table, pv, pd, ratio, tiles_n, tiles, RBLOCK=REDUCE_BLOCK)
            _rescale_kernel[(tiles, count)](table, d, ratio, m, k, n, G_DT=tl_dtype(g_dt), HAS_BIAS=has_bias,
                                            **blocks)

    dtypes = ",".join(sorted({f"{key[2]}/{key[3]}/{key[4]}" for key in classes}))
    bucket = shape_bucket(max(g.shape[0] for g in grads), max(g.shape[1] for g in grads), n_layers)
    restore = [*grads, *(b for b in biases if b is not None)]
    KRONECKER_CONFIGS.launch(device=device, bucket=bucket, dtype=dtypes, run=run, restore=restore)
    return ratio


def kronecker_precondition_reference(
    left: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    right: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Plain PyTorch twin of :func:`kronecker_precondition` (concatenates ``V``; same contract).

    Math in fp32, or float64 when a layer's gradient or factors are float64 (the tests' reference);
    the ratios are returned in that dtype promoted over all layers.
    """
    biases = [None] * len(grads) if biases is None else list(biases)
    ratios = []
    for jl, g, jr, b in zip(left, grads, right, biases):
        dtype = torch.promote_types(torch.promote_types(g.dtype, jl.dtype), torch.promote_types(jr.dtype,
                                                                                               torch.float32))
        v = g.to(dtype) if b is None else torch.cat([g.to(dtype), b.to(dtype)[:, None]], dim=1)
        d = jl.to(dtype) @ v @ jr.to(dtype)
        v2, d2 = v.square().sum(), d.square().sum()
        big = torch.finfo(torch.float32).max
        ratio = v2.sqrt() / d2.sqrt()
        ok = (v2 <= big) & (d2 <= big) & (d2 > 0) & (ratio > 0) & (ratio <= big)
        result = torch.where(ok, d * ratio, v)
        g.copy_(result[:, :g.shape[1]])
        if b is not None:
            b.copy_(result[:, -1])
        ratios.append(torch.where(ok, ratio, torch.nan))
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in ratios) else torch.float32
    return torch.stack(ratios).to(dtype) if ratios else torch.empty(0, dtype=torch.float32)
