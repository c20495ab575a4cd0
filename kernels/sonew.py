"""SONew step (Devvrit et al., NeurIPS 2023): banded LogDet-optimal sparse preconditioners, multi-tensor.

Per tensor, flattened row-major to length ``n``, with band ``b`` (``b = offdiag.shape[0]``) and step
``t = step + 1`` (state ``step`` counts completed steps)::

    mu      <- b1 mu + (1 - b1) g
    nu_d[i] <- b2 nu_d[i] + (1 - b2) g_i^2
    nu_j[i] <- b2 nu_j[i] + (1 - b2) g_i g_{i+j}          lags j = 1..b, rows i + j < n
    mu^ = mu / (1 - b1^t) ;  S = band(nu) / (1 - b2^t) + damp * I
    damp = eps                                    (absolute, the default)
         = max(eps * max_i sum_k |S^_ik|, 1e-24)   (relative_eps: max abs row sum of the undamped
                                                   bias-corrected band statistics S^)

``b <= MAX_BAND = 4``. Relative damping is ``docs/sonew.md``'s ``||S||`` (max abs row sum) for every band;
the JAX reference applies it to band 1 only, and its ``getl1norm_tds`` overwrites instead of adding the
second off-diagonal term of each row (it takes ``max_i S_ii + |S_{i-1,i}|``, row 0 with ``|S_{0,1}|``).

**Sparse inverse.** X is the LogDet-optimal (max-determinant completion) inverse with the band's
sparsity: ``X = L D L^T`` with ``L`` unit lower-banded. Row ``k`` regresses on its kept nearest
neighbours ``k+1..k+m`` (``m <= b``, rows past ``n`` do not exist)::

    psi_k = A_m^{-1} s_m,   A_m = S[k+1:k+m+1, k+1:k+m+1],  s_m = S[k+1:k+m+1, k]
    c_k   = S_kk - s_m^T psi_k,   D_k = 1 / c_k,   L[k+p, k] = -psi_k[p-1]

For band 1 this is the closed form ``psi_k = S_{k,k+1} / S_{k+1,k+1}``, ``c_k = S_kk - S_{k,k+1} psi_k``.
With every edge kept, ``X^{-1}`` equals ``S`` on the band and ``X`` is zero off it.

**Dropped edges.** ``A_m`` is factorised by symmetric Gaussian elimination in the order k+1, k+2, ...;
eliminating neighbour ``p`` yields its conditional variance (the pivot ``r_p``) and the conditional
variance ``c_k^(p)`` of row k given neighbours 1..p. Neighbours are kept while, for every ``p <= m``,
``r_p > DROP_TOL * S_{k+p,k+p}`` and ``c_k^(p) > DROP_TOL * S_kk``; the first failure drops that edge and
every farther one. This is the tridiagonal rule "where c_k <= 0, drop edge k" (band 1 keeps its edge
iff ``c_k > DROP_TOL * S_kk``) extended farthest-edge-first; the JAX banded reference instead re-weights
the farthest edge so that ``c_k = eps_mach * S_kk``, i.e. ``D_k S_kk = 1e7``.

``DROP_TOL = 1e-3`` is where "<= 0" is decided, chosen so that the decision does not depend on
rounding: c_k^(p) is formed through pivots, and with every pivot above ``DROP_TOL`` of its diagonal its
fp32 error is at most about ``u / DROP_TOL ~ 1e-4`` of S_kk (u = 6e-8), a tenth of the threshold (with
1e-4 the decisions flipped between fp32 and float64 in testing). It caps the amplification D_k S_kk at
1e3; for band 1 an edge goes when its correlation exceeds 0.9995. The first step is the standard case:
the band of a rank-1 statistic is singular, and wherever the damping is below ``DROP_TOL * g_k^2`` the
edges of row k are dropped (X is diag(1 / S_kk) where all are).

**Direction and update**::

    x = X mu^ = L (D (L^T mu^))        (never formed; O(n b) after the n independent b x b solves)
    a = mu^ / (sqrt(nu_d^) + graft_eps)  (graft "adam"),  g / (sqrt(nu_d^) + graft_eps)  ("rmsprop"),
        g ("sgd");   nu_d^ = nu_d / (1 - b2^t), undamped
    d = (||a|| / ||x||) x  (grafted; scale 0 when ||x|| = 0)  or  d = x  (graft "none")
    d = a_adam, no grafting, for tensors with ``precondition=False`` (the plain Adam update)
    w <- w - lr (d + wd w)

``a`` and the ratio are ``kernels.graft``'s ``graft_vector`` and ``graft_ratio``, shared with the
Kronecker-factored optimizers' ``graft_step`` (``docs/grafting.md``).

**Shards** (FSDP2/HSDP: ``kfopt.halos`` gathers the halos, ``kfopt.sharding`` the reductions): a tensor
may be the rows ``[o, o + n)`` of a longer flattened one. Rows ``k`` of its window (``k + p``, ``i - p``,
``|p| <= b``) outside ``[0, n)`` but inside ``[-halo_left, n + halo_right)`` read their gradient and old
statistics from the tensor's halo table, rows outside that range do not exist (as past the ends of a
whole tensor); the EMAs of the halo rows are recomputed (the owner computes the same bits) and never
stored. The lag-``j`` statistic of a row exists while ``row + j < n + halo_right``. With the norms and
the gradient's sum of squares and non-finite count all-reduced (``reduce``, a SUM) and the relative
damping's per-tensor row maxima too (``reduce_max``, a MAX), every row of the shard gets the value of a
call on the whole tensor.

**Kernels** (one launch each over every tensor of a dtype group; no host synchronisation):

0. gradient norm + finiteness (``multi_tensor.launch_global_norm``, no clipping): if any gradient is
   non-finite (or a GradScaler's ``found_inf`` is set) nothing below writes state or weights, and
   ``skipped`` is incremented; under a GradScaler every gradient is multiplied by ``1 / grad_scale``
   (in fp32) where it is loaded;
1. halo snapshot: the old ``mu, nu_d, nu_1..nu_b`` of the ``2b`` rows around every tile boundary
   (tile = BLOCK rows) into a side buffer -- ``2b(2 + b)`` floats per tile, negligible;
2. (``relative_eps`` only) per-chunk max abs row sum of the new statistics, then a per-tensor max;
3. pass 1, per tile of BLOCK rows: the new EMAs of the tile and of its ``b``-row halo on each side
   (recomputed from old state + g; inside the tile old state is read before a barrier and
   overwritten after it, outside the tile it comes from the snapshot, because the neighbouring tile
   -- this program's previous iteration or another program -- may already have overwritten it), the
   ``b + 1`` row factorisations (psi, D) that ``x_i`` needs (rows i-b..i, batched in registers, fully
   unrolled), ``x``, the graft vector, the direction ``d`` into a scratch buffer, and per-chunk
   partials ``(sum d^2, sum a^2)``; a two-level per-tensor reduction turns them into norms and
   advances ``step``;
4. pass 2: ``w <- w - lr (scale d + wd w)``.

**Precision on the GPU** (``multi_tensor``'s module docstring has the instruction-level details): the
bias corrections enter as ``1 / (1 - b_k^t)`` from ``multi_tensor.inv_bias_correction`` -- float64 on
the device from ``ln b_k`` formed in float64 on the host, within ~1 fp32 ulp (an approximate
``1 - exp2(t log2 b)`` is off by ~1e-4 relative for b2 = 0.999 at t = 1, and the band statistics, the
damping and every graft vector scale with it) -- and are applied as multiplications: a common
scale error of S is not amplified by the solves (X scales by its inverse), unlike independent
per-entry errors. The reciprocals of the elimination (pivots and ``c_k``), the graft vector's
division and square root and the graft ratio are correctly rounded (``div_rn``, ``sqrt_rn``; on sm_90
``div.rn.f32``/``sqrt.rn.f32`` instead of the ~2 ulp ``div.full.f32``/``sqrt.approx.ftz.f32``): the
conditional variances are formed by cancellation, amplifying each rounding error up to
``1 / DROP_TOL``, and the drop rule's margin above assumes correctly rounded operations -- those the
interpreter (numpy) uses, so a compiled step differs from the interpreted one only by FMA contraction
and summation order.

Tensors the step writes (params, exp_avgs, diags, offdiags, steps, skipped) must not share memory,
with each other or with a gradient: ``aliasing.check_no_overlap`` raises a ValueError naming the
two entries.

Bytes per fp32 parameter: 4 (norm pre-read of g) + 24 + 8b (pass 1: g, mu, nu_d, nu_1..b read;
mu, nu_d, nu_1..b and d written) + 12 (pass 2: w, d read, w written) = ``40 + 8b`` (48 for the
tridiagonal case); ``relative_eps`` adds one read of g, nu_d, nu_1..b (8 + 4b). The direction scratch
is 4 bytes per parameter of transient memory. The state (the parameter order is the flattened
row-major order of ``p``): ``exp_avg`` (shape of p), ``diag`` (n,), ``offdiag`` (b, n) with
``offdiag[j-1, i]`` the lag-j statistic of rows i, i+j (entries ``i >= n + halo_right - j`` stay zero),
all fp32 (``kfopt.SONew`` keeps ``diag`` shaped like p and ``offdiag`` as ``(b, *p.shape)`` and passes
flat views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .graft import GRAFTS as GRAFT_VECTORS
from .graft import graft_ratio, graft_ratio_reference, graft_vector, graft_vector_reference
from .multi_tensor import (
    REDUCE_BLOCK,
    global_norm_reference,
    inv_bias_correction,
    launch_chunks,
    launch_global_norm,
    launch_segment_norms,
    program_chunk,
    tensor_norms_reference,
)
from .op_declaration import (
    Call,
    ElementwiseOp,
    Hyperparameters,
    TensorArg,
    Traffic,
    flat_like_param,
    like_param,
    log_decay,
    one_element,
    within,
)

#: Largest supported band. Pass 1 unrolls b + 1 eliminations of b x b windows per row: sm_90 compile
#: time grows ~b^5 (band 4: ~10 s per config, band 8: ~6 min) and band 4 already needs one row per thread
#: to stay within 255 registers.
MAX_BAND = 4
#: Relative conditional variance at or below which an edge is dropped (see the module docstring).
DROP_TOL = 1e-3
#: Floor of the relative damping (the JAX reference's ``min_eps``).
MIN_RELATIVE_DAMPING = 1e-24
#: Graft vectors, by name: ``kernels.graft``'s, and "none" (0: the direction ``x`` as it is).
GRAFTS = {"none": 0, **GRAFT_VECTORS}



@dataclass(frozen=True)
class SonewHyperparameters(Hyperparameters):
    """One tensor's SONew hyperparameters; the fields in order are the columns of the kernels' table.
    ``graft`` is stored as its number in :data:`GRAFTS` ("none" for a tensor with ``precondition=False``,
    which takes the plain Adam update); ``band`` is the tensor's band, ``offdiags[i].shape[0]``;
    ``halo_left``/``halo_right`` how many rows of the tensor's halo exist before and after it (0 without a
    halo)."""

    lr: float = field(metadata=within("[0, inf)"))
    beta1: float = field(default=0.9, metadata=within("[0, 1)"))
    beta2: float = field(default=0.99, metadata=within("[0, 1)"))
    eps: float = field(default=1e-8, metadata=within("(0, inf)"))
    weight_decay: float = field(default=0.0, metadata=within("[0, inf)"))
    graft: str = field(default="adam", metadata={"choices": GRAFTS})
    graft_eps: float = field(default=1e-8, metadata=within("(0, inf)"))
    relative_eps: bool = False
    precondition: bool = True
    halo_left: int = 0
    halo_right: int = 0
    band: int = field(default=0, metadata={"from_tensors": True})
    ln_beta1: float = field(init=False)
    ln_beta2: float = field(init=False)

    def derive(self) -> dict:
        return dict(graft=self.graft if self.precondition else float(GRAFTS["none"]),
                    ln_beta1=log_decay("beta1", self.beta1), ln_beta2=log_decay("beta2", self.beta2))


def _band_of_params(t: torch.Tensor, p: torch.Tensor) -> str | None:
    """Shape rule of ``offdiags``: ``(band, numel)`` with ``0 <= band <= MAX_BAND``."""
    if t.dim() == 2 and t.shape[1] == p.numel() and t.shape[0] <= MAX_BAND:
        return None
    return f"expected shape (band, {p.numel()}) with 0 <= band <= {MAX_BAND}, got {tuple(t.shape)}"


def _halo_shape(t: torch.Tensor, p: torch.Tensor) -> str | None:
    """Shape rule of ``halos``: ``(3 + b, 2 b)`` with ``1 <= b <= MAX_BAND`` (b: the tensor's band)."""
    b = t.shape[0] - 3 if t.dim() == 2 else -1
    if 1 <= b <= MAX_BAND and t.shape[1] == 2 * b:
        return None
    return f"expected shape (3 + band, 2 band) with 1 <= band <= {MAX_BAND}, got {tuple(t.shape)}"


def sonew_traffic(shapes: Sequence[tuple], dtype: torch.dtype, bands: Sequence[int],
                  relative_eps: bool = False) -> Traffic:
    """One call on fp32 state, per parameter of a tensor with band b: g pre-read (norm) + pass 1 (g, mu,
    nu_d, nu_1..b read; mu, nu_d, nu_1..b, d written) + pass 2 (w, d read; w written) = 2 s_g + 2 s_p +
    24 + 8 b bytes (48 fp32 at b = 1); ``relative_eps`` adds a read of g, nu_d, nu_1..b (s_g + 4 + 4 b).
    Flops: about 30 + 10 b + (b + 1)^2 b per parameter (the EMAs, the b + 1 row eliminations of pass 1,
    the direction and the update)."""
    s = torch.finfo(dtype).bits // 8
    total_bytes = total_flops = 0
    for shape, b in zip(shapes, bands):
        n = math.prod(shape)
        total_bytes += n * (4 * s + 24 + 8 * b + (s + 4 + 4 * b if relative_eps else 0))
        total_flops += n * (30 + 10 * b + (b + 1) ** 2 * b)
    return Traffic(bytes=total_bytes, flops=total_flops)


SONEW = ElementwiseOp(
    "sonew_step", SonewHyperparameters,
    (TensorArg("params", written=True),
     TensorArg("grads", written=False, shape=like_param),
     TensorArg("exp_avgs", written=True, state=True, shape=like_param, layout="contiguous"),
     TensorArg("diags", written=True, state=True, shape=flat_like_param, layout="contiguous"),
     TensorArg("offdiags", written=True, state=True, shape=_band_of_params, layout="contiguous"),
     TensorArg("steps", written=True, state=True, shape=one_element, layout="contiguous"),
     TensorArg("halos", written=False, state=True, shape=_halo_shape, layout="contiguous", optional=True)),
    sonew_traffic,
    scratch=("directions",),
)
A = SONEW.addr
H = SONEW.hyper

_DROP_TOL = tl.constexpr(DROP_TOL)
_MIN_RELATIVE_DAMPING = tl.constexpr(MIN_RELATIVE_DAMPING)
_GRAFT_NONE, _GRAFT_ADAM = tl.constexpr(GRAFTS["none"]), tl.constexpr(GRAFTS["adam"])

#: 1, 2 or 4 rows per thread: pass 1 holds ~(b + 1)(b + 2) live values per row (sm_90, ptxas: band 1
#: 46 registers at one row per thread, 72 at two; band 4 140 at one, spills at two).
SONEW_CONFIGS = ConfigSpace(
    "sonew_step",
    [
        Config({"BLOCK": 32 * warps * rows, "CHUNK": 32 * warps * rows * iters}, num_warps=warps)
        for rows in (1, 2, 4)
        for iters in (4, 8, 16)
        for warps in (4, 8)
    ],
    default=Config({"BLOCK": 256, "CHUNK": 2048}, num_warps=4),
)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _tensor_pointers(addr_ptr, tid):
    """Addresses of tensor ``tid``'s state columns (fp32)."""
    row = addr_ptr + tid * A.width
    m_ptr = tl.load(row + A.exp_avgs).to(tl.pointer_type(tl.float32))
    nu_ptr = tl.load(row + A.diags).to(tl.pointer_type(tl.float32))
    off_ptr = tl.load(row + A.offdiags).to(tl.pointer_type(tl.float32))
    dir_ptr = tl.load(row + A.directions).to(tl.pointer_type(tl.float32))
    step_ptr = tl.load(row + A.steps).to(tl.pointer_type(tl.float32))
    return m_ptr, nu_ptr, off_ptr, dir_ptr, step_ptr


@triton.jit
def _halo_of(addr_ptr, hyper_ptr, tid):
    """Tensor ``tid``'s halo: its address (fp32) and how many rows exist before (``left``) and after
    (``right``) the tensor's own."""
    halo_ptr = tl.load(addr_ptr + tid * A.width + A.halos).to(tl.pointer_type(tl.float32))
    left = tl.load(hyper_ptr + tid * H.width + H.halo_left).to(tl.int32)
    right = tl.load(hyper_ptr + tid * H.width + H.halo_right).to(tl.int32)
    return halo_ptr, left, right


@triton.jit
def _old_state(base, r, inside, local, own, slot, halo, hstride, Q: tl.constexpr, BAND: tl.constexpr):
    """Old value of state quantity ``Q`` (0 mu, 1 nu_d, 1 + j lag j) at rows ``r`` (0 where not
    ``inside``): from memory in this tile (``own``), from the tile-boundary snapshot (``slot``) for the
    tensor's other rows (``local``), from the halo (``halo``: the row's column of the tensor's halo, whose
    rows are ``hstride`` apart; quantity Q is in row ``1 + Q``) for rows outside the tensor."""
    return (tl.load(base + r, mask=own & inside, other=0.0)
            + tl.load(slot + Q * 2 * BAND, mask=local & (~own) & inside, other=0.0)
            + tl.load(halo + (1 + Q) * hstride, mask=(~local) & inside, other=0.0))


@triton.jit
def _new_statistics(g_ptr, m_ptr, nu_ptr, off_ptr, slot_ptr, halo_ptr, rows, r0, n, left, right, bt, b1, b2, coef,
                    G_DT: tl.constexpr, BAND: tl.constexpr, BLOCK: tl.constexpr):
    """This step's EMAs around ``rows``, as tuples indexed by shift ``s + BAND`` for s in -BAND..BAND:
    ``gs`` (g: the stored gradient times ``coef``, 1 or 1 / grad_scale), ``mus`` (mu), ``nus`` (nu_d),
    ``offs[j-1]`` (lag j, shifts -BAND..BAND-j). Zero for rows outside ``[-left, n + right)`` (the
    tensor and the halo rows that exist) and for lags beyond the tensor's band ``bt`` or reaching past
    ``n + right``. Old state of the tensor's rows outside the tile ``[r0, r0 + BLOCK)`` comes from the
    snapshot: ``slot_ptr`` is this tile's boundary record (rows r0 - BAND .. r0 + BAND - 1), the next
    tile's record follows it; gradient and old state of rows outside the tensor come from the halo
    (``halo_ptr``, a ``(3 + bt, 2 bt)`` table with the rows -bt..-1 and n..n+bt-1 in its columns)."""
    REC: tl.constexpr = (2 + BAND) * 2 * BAND
    gs = ()
    locals_ = ()
    owns = ()
    slots = ()
    halos = ()
    mus = ()
    nus = ()
    for s in tl.static_range(2 * BAND + 1):
        r = rows + (s - BAND)
        inside = (r >= -left) & (r < n + right)
        local = (r >= 0) & (r < n)
        after = r >= r0 + BLOCK
        own = (r >= r0) & (r < r0 + BLOCK) & local
        slot = slot_ptr + (tl.where(after, r - (r0 + BLOCK) + REC, r - r0) + BAND)
        halo = halo_ptr + tl.where(r < 0, r + bt, r - n + bt)
        g = (tl.load(g_ptr + r, mask=local, other=0.0).to(tl.float32)
             + tl.load(halo, mask=(~local) & inside, other=0.0)) * coef
        mus = mus + (b1 * _old_state(m_ptr, r, inside, local, own, slot, halo, 2 * bt, 0, BAND) + (1.0 - b1) * g,)
        nus = nus + (b2 * _old_state(nu_ptr, r, inside, local, own, slot, halo, 2 * bt, 1, BAND) + (1.0 - b2) * g * g,)
        gs = gs + (g,)
        locals_ = locals_ + (local,)
        owns = owns + (own,)
        slots = slots + (slot,)
        halos = halos + (halo,)
    offs = ()
    for j in tl.static_range(1, BAND + 1):
        hi_lag = tl.where(j <= bt, n + right - j, -left)
        lag = ()
        for s in tl.static_range(2 * BAND + 1 - j):
            r = rows + (s - BAND)
            inside = (r >= -left) & (r < hi_lag)
            old = _old_state(off_ptr + (j - 1) * n, r, inside, locals_[s], owns[s], slots[s], halos[s], 2 * bt,
                             1 + j, BAND)
            lag = lag + (tl.where(inside, b2 * old + (1.0 - b2) * gs[s] * gs[s + j], 0.0),)
        offs = offs + (lag,)
    return gs, mus, nus, offs


@triton.jit
def _conditional_regression(c0, U, s, BAND: tl.constexpr):
    """Row factor of the sparse inverse, batched over a block of rows k.

    ``c0 = S_kk``; ``U`` the upper triangle of the window of the following rows (``U[p][q - p]`` is
    entry (p, q), q >= p, of neighbours p+1, q+1; identity rows for neighbours that do not exist);
    ``s[p] = S_{k, k+p+1}`` (0 if absent). Returns ``(psi, 1 / c_k)`` for the kept prefix of
    neighbours (module docstring: dropped edges). Reciprocals are correctly rounded (``div_rn``)."""
    diag0 = ()
    for p in tl.static_range(BAND):
        diag0 = diag0 + (U[p][0],)
    c = c0
    c_kept = c0
    alive = c0 > 0.0
    kept = (c0 * 0.0).to(tl.int32)
    invs = ()
    for p in tl.static_range(BAND):
        piv = U[p][0]
        piv_ok = piv > _DROP_TOL * diag0[p]
        inv = tl.div_rn(1.0, tl.where(piv_ok, piv, 1.0))
        c = c - s[p] * s[p] * inv
        alive = alive & piv_ok & (c > _DROP_TOL * c0)
        c_kept = tl.where(alive, c, c_kept)
        kept += alive.to(tl.int32)
        invs = invs + (inv,)
        # eliminate neighbour p from the rows after it (rows up to p are final from here on)
        eliminated = ()
        s_next = ()
        for q in tl.static_range(BAND):
            if q > p:
                mult = U[p][q - p] * inv
                row = ()
                for r in tl.static_range(q, BAND):
                    row = row + (U[q][r - q] - mult * U[p][r - p],)
                eliminated = eliminated + (row,)
                s_next = s_next + (s[q] - mult * s[p],)
            else:
                eliminated = eliminated + (U[q],)
                s_next = s_next + (s[q],)
        U = eliminated
        s = s_next
    # back substitution over the kept prefix
    psi_rev = ()
    for j in tl.static_range(BAND - 1, -1, -1):
        acc = s[j]
        for q in tl.static_range(j + 1, BAND):
            acc -= U[j][q - j] * psi_rev[BAND - 1 - q]
        psi_rev = psi_rev + (tl.where(j < kept, acc * invs[j], 0.0),)
    psi = ()
    for p in tl.static_range(BAND):
        psi = psi + (psi_rev[BAND - 1 - p],)
    return psi, tl.div_rn(1.0, c_kept)


@triton.jit
def _sparse_inverse_apply(mus, nus, offs, rows, lo, hi, bt, inv_bc1, inv_bc2, damp, BAND: tl.constexpr):
    """``x = X mu^`` at ``rows``: ``x_i = z_i - sum_p psi_{i-p}[p-1] z_{i-p}``,
    ``z_k = D_k (mu^_k - sum_p psi_k[p-1] mu^_{k+p})``, with the factors of rows i-BAND..i;
    ``inv_bc1``, ``inv_bc2`` the reciprocal bias corrections (mu^ = mu inv_bc1, S = nu inv_bc2 + damp);
    rows ``[lo, hi)`` exist (the tensor, ``[0, n)``, and the halo rows around it)."""
    x = nus[BAND] * 0.0
    for back in tl.static_range(BAND + 1):
        k = rows - back
        exists = ()  # neighbour p of row k exists and is within the tensor's band
        for p in tl.static_range(1, BAND + 1):
            exists = exists + (k + p < tl.where(p <= bt, hi, lo),)
        U = ()  # upper triangle of the window of neighbours 1..BAND
        svec = ()
        for p in tl.static_range(1, BAND + 1):
            row = (tl.where(exists[p - 1], nus[BAND - back + p] * inv_bc2 + damp, 1.0),)
            for q in tl.static_range(p + 1, BAND + 1):
                row = row + (tl.where(exists[q - 1], offs[q - p - 1][BAND - back + p] * inv_bc2, 0.0),)
            U = U + (row,)
            svec = svec + (tl.where(exists[p - 1], offs[p - 1][BAND - back] * inv_bc2, 0.0),)
        psi, dinv = _conditional_regression(nus[BAND - back] * inv_bc2 + damp, U, svec, BAND)
        z = mus[BAND - back]
        for p in tl.static_range(1, BAND + 1):
            z -= psi[p - 1] * mus[BAND - back + p]
        z = tl.where(k >= lo, dinv * z * inv_bc1, 0.0)
        if back == 0:
            x += z
        else:
            x -= psi[back - 1] * z
    return x


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _sonew_halo_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, snap_ptr,
    BAND: tl.constexpr, HALO: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """snap[tile, q, h] = old quantity q (mu, nu_d, lags 1..BAND) of row tile_start - BAND + h, h < 2 BAND
    (the tensor's own rows only)."""
    REC: tl.constexpr = (2 + BAND) * 2 * BAND
    TILES: tl.constexpr = CHUNK // BLOCK
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    bt = tl.load(hyper_ptr + tid * H.width + H.band).to(tl.int32)
    right = tl.load(hyper_ptr + tid * H.width + H.halo_right).to(tl.int32)
    m_ptr, nu_ptr, off_ptr, dir_ptr, step_ptr = _tensor_pointers(addr_ptr, tid)
    tiles = tl.arange(0, TILES)[:, None]
    h = tl.arange(0, HALO)[None, :]
    rows = start + tiles * BLOCK - BAND + h
    inside = (h < 2 * BAND) & (rows >= 0)
    dst = snap_ptr + (pid * TILES + tiles) * REC + h
    tl.store(dst, tl.load(m_ptr + rows, mask=inside & (rows < n), other=0.0), mask=inside & (rows < n))
    tl.store(dst + 2 * BAND, tl.load(nu_ptr + rows, mask=inside & (rows < n), other=0.0), mask=inside & (rows < n))
    for j in tl.static_range(1, BAND + 1):
        valid = inside & (rows < n) & (rows < tl.where(j <= bt, n + right - j, 0))
        tl.store(dst + (1 + j) * 2 * BAND, tl.load(off_ptr + (j - 1) * n + rows, mask=valid, other=0.0), mask=valid)


@triton.jit
def _sonew_row_sum_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, snap_ptr, partial_ptr,
    G_DT: tl.constexpr, BAND: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """partial[k] = max over chunk k's rows of the new band statistics' abs row sum (before bias
    correction) of the tensor's own rows; tensors without relative damping read nothing and give 0."""
    REC: tl.constexpr = (2 + BAND) * 2 * BAND
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    g_ptr = tl.load(addr_ptr + tid * A.width + A.grads).to(tl.pointer_type(G_DT))
    m_ptr, nu_ptr, off_ptr, dir_ptr, step_ptr = _tensor_pointers(addr_ptr, tid)
    halo_ptr, left, right = _halo_of(addr_ptr, hyper_ptr, tid)
    h = hyper_ptr + tid * H.width
    b1 = tl.load(h + H.beta1)
    b2 = tl.load(h + H.beta2)
    bt = tl.load(h + H.band).to(tl.int32)
    n = tl.where((tl.load(h + H.relative_eps) != 0) & (tl.load(clip_ptr + 2) != 0), n, 0)
    coef = tl.load(clip_ptr + 1)  # 1, or 1 / grad_scale
    best = tl.zeros([BLOCK], tl.float32)
    for off in range(0, tl.minimum(n - start, CHUNK), BLOCK):
        r0 = start + off
        rows = r0 + tl.arange(0, BLOCK)
        slot_ptr = snap_ptr + (pid * (CHUNK // BLOCK) + off // BLOCK) * REC
        gs, mus, nus, offs = _new_statistics(g_ptr, m_ptr, nu_ptr, off_ptr, slot_ptr, halo_ptr, rows, r0, n, left,
                                             right, bt, b1, b2, coef, G_DT, BAND, BLOCK)
        total = nus[BAND]
        for j in tl.static_range(1, BAND + 1):
            total += tl.abs(offs[j - 1][BAND]) + tl.abs(offs[j - 1][BAND - j])
        best = tl.maximum(best, tl.where(rows < n, total, 0.0))
    tl.store(partial_ptr + pid, tl.max(best, axis=0))


@triton.jit
def _segment_max_kernel(partial_ptr, bounds_ptr, out_ptr, RBLOCK: tl.constexpr):
    """out[i] = max of the (non-negative) chunk partials of tensor i."""
    tid = tl.program_id(0)
    lo = tl.load(bounds_ptr + tid * 2)
    hi = tl.load(bounds_ptr + tid * 2 + 1)
    best = tl.zeros([RBLOCK], tl.float32)
    for off in range(lo, hi, RBLOCK):
        idx = off + tl.arange(0, RBLOCK)
        best = tl.maximum(best, tl.load(partial_ptr + idx, mask=idx < hi, other=0.0))
    tl.store(out_ptr + tid, tl.max(best, axis=0))


@triton.jit
def _sonew_direction_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, snap_ptr, row_max_ptr,
    partial_ptr,
    G_DT: tl.constexpr, BAND: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    HAS_RELATIVE: tl.constexpr,
):
    """Pass 1: EMAs, sparse-inverse direction d into the scratch, partial[k] = (sum d^2, sum a^2)."""
    REC: tl.constexpr = (2 + BAND) * 2 * BAND
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    g_ptr = tl.load(addr_ptr + tid * A.width + A.grads).to(tl.pointer_type(G_DT))
    m_ptr, nu_ptr, off_ptr, dir_ptr, step_ptr = _tensor_pointers(addr_ptr, tid)
    halo_ptr, left, right = _halo_of(addr_ptr, hyper_ptr, tid)
    t = tl.load(step_ptr) + 1.0
    h = hyper_ptr + tid * H.width
    b1 = tl.load(h + H.beta1)
    b2 = tl.load(h + H.beta2)
    eps = tl.load(h + H.eps)
    graft_eps = tl.load(h + H.graft_eps)
    bt = tl.load(h + H.band).to(tl.int32)
    graft = tl.load(h + H.graft).to(tl.int32)
    precondition = tl.load(h + H.precondition)
    inv_bc1 = inv_bias_correction(t, tl.load(h + H.ln_beta1))  # 1 / (1 - b1^t)
    inv_bc2 = inv_bias_correction(t, tl.load(h + H.ln_beta2))
    damp = eps
    if HAS_RELATIVE:
        relative = tl.maximum(eps * tl.load(row_max_ptr + tid) * inv_bc2, _MIN_RELATIVE_DAMPING)
        damp = tl.where(tl.load(h + H.relative_eps) != 0, relative, eps)
    n = tl.where(tl.load(clip_ptr + 2) != 0, n, 0)  # a skipped step reads and writes nothing
    coef = tl.load(clip_ptr + 1)  # 1, or 1 / grad_scale
    d_sq = tl.zeros([BLOCK], tl.float32)
    a_sq = tl.zeros([BLOCK], tl.float32)
    for off in range(0, tl.minimum(n - start, CHUNK), BLOCK):
        r0 = start + off
        rows = r0 + tl.arange(0, BLOCK)
        mask = rows < n
        slot_ptr = snap_ptr + (pid * (CHUNK // BLOCK) + off // BLOCK) * REC
        gs, mus, nus, offs = _new_statistics(g_ptr, m_ptr, nu_ptr, off_ptr, slot_ptr, halo_ptr, rows, r0, n, left,
                                             right, bt, b1, b2, coef, G_DT, BAND, BLOCK)
        x = _sparse_inverse_apply(mus, nus, offs, rows, -left, n + right, bt, inv_bc1, inv_bc2, damp, BAND)
        # a tensor that is not preconditioned takes the Adam vector as its d (its graft is "none",
        # SonewHyperparameters, so it is not scaled and its a is not used)
        a = graft_vector(tl.where(precondition != 0, graft, _GRAFT_ADAM), gs[BAND], mus[BAND], nus[BAND], inv_bc1,
                         inv_bc2, graft_eps)
        d = tl.where(precondition != 0, x, a)
        d_sq += tl.where(mask, d * d, 0.0)
        a_sq += tl.where(mask, tl.where(precondition != 0, a * a, 0.0), 0.0)
        # every read of this tile's old state (by any thread) happens before any write below
        tl.debug_barrier()
        tl.store(m_ptr + rows, mus[BAND], mask=mask)
        tl.store(nu_ptr + rows, nus[BAND], mask=mask)
        for j in tl.static_range(1, BAND + 1):
            tl.store(off_ptr + (j - 1) * n + rows, offs[j - 1][BAND],
                     mask=mask & (rows < tl.where(j <= bt, n + right - j, 0)))
        tl.store(dir_ptr + rows, d, mask=mask)
    tl.store(partial_ptr + pid * 2, tl.sum(d_sq, axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.sum(a_sq, axis=0))


@triton.jit
def _sonew_apply_kernel(
    addr_ptr, numel_ptr, chunk_tensor_ptr, chunk_start_ptr, hyper_ptr, clip_ptr, norms_ptr,
    P_DT: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):
    """Pass 2: w <- w - lr (scale d + wd w), scale = ||a|| / ||d|| (1 without grafting, 0 if ||d|| = 0)."""
    pid, tid, start, n = program_chunk(chunk_tensor_ptr, chunk_start_ptr, numel_ptr)
    p_ptr = tl.load(addr_ptr + tid * A.width + A.params).to(tl.pointer_type(P_DT))
    dir_ptr = tl.load(addr_ptr + tid * A.width + A.directions).to(tl.pointer_type(tl.float32))
    h = hyper_ptr + tid * H.width
    lr = tl.load(h + H.lr)
    wd = tl.load(h + H.weight_decay)
    d_norm = tl.load(norms_ptr + tid * 2)
    a_norm = tl.load(norms_ptr + tid * 2 + 1)
    scale = tl.where(tl.load(h + H.graft).to(tl.int32) == _GRAFT_NONE, 1.0, graft_ratio(a_norm, d_norm))
    n = tl.where(tl.load(clip_ptr + 2) != 0, n, 0)  # a skipped step writes nothing
    for off in range(0, tl.minimum(n - start, CHUNK), BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dir_ptr + offs, mask=mask, other=0.0)
        tl.store(p_ptr + offs, (w - lr * (scale * d + wd * w)).to(P_DT), mask=mask)


# ----------------------------------------------------------------------------- launcher


def sonew_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    diags: Sequence[torch.Tensor],
    offdiags: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    halos: Sequence[torch.Tensor | None] | None = None,
    *,
    skipped: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], None] | None = None,
    reduce_max: Callable[[torch.Tensor], None] | None = None,
    **hyperparameters,
) -> torch.Tensor:
    """One SONew step over all tensors, in place (see the module docstring for the math).

    ``hyperparameters``: the fields of :class:`SonewHyperparameters` (``lr`` required; ``beta1``,
    ``beta2``, ``eps``, ``weight_decay``, ``graft``, ``graft_eps``, ``relative_eps``, ``precondition``
    with its defaults), each a value or one per tensor; ``graft`` is "adam", "rmsprop", "sgd" or
    "none"; ``precondition=False`` gives a tensor the plain Adam update (``mu^ / (sqrt(nu_d^) +
    graft_eps)``, no grafting). Each tensor's band is ``offdiags[i].shape[0]`` (0..MAX_BAND; lags
    reaching past the tensor's end are simply absent). ``params`` fp32/bf16/fp16 of any layout
    (non-contiguous ones are updated through a contiguous copy), ``grads`` like them; ``exp_avgs``
    (shape of params), ``diags`` (n,), ``offdiags`` (band, n) contiguous fp32 (float64 on the
    reference path); ``steps`` 0-d fp32 counts of completed steps; ``skipped`` an optional 0-d int32
    counter. Returns ``[||g_all||, coef, ok]`` as a device tensor (``coef`` the factor the stored gradients
    are multiplied by: 1, or ``1 / grad_scale``). Betas must be in [0, 1). ``grad_scale``/``found_inf``:
    a GradScaler's tensors, as for :func:`kfopt.kernels.lamb_step`. Argument checks: :data:`SONEW`
    (``kernels.checks``).

    **Shards** (module docstring): the tensors may be the rows ``[o, o + n)`` of longer flattened tensors of
    ``N`` entries. ``halos[i]`` (None: no halo) is then a ``(3 + b, 2 b)`` table (b: the tensor's band) of
    the rows ``o - b .. o - 1`` (columns ``0..b-1``) and ``o + n .. o + n + b - 1`` (columns ``b..2b-1``):
    row 0 the stored gradient (in fp32), row 1 the old ``mu``, row 2 the old ``nu_d``, row ``2 + j`` the
    old lag-``j`` statistic; ``halo_left = min(b, o)`` and ``halo_right = min(b, N - o - n)`` say how
    many of them exist (the others are not read). ``reduce`` (an in-place SUM all-reduce over the
    shards, as for :func:`kfopt.kernels.lamb_step`) makes the gradient norm, its finiteness and the graft
    norms those of the whole tensors; ``reduce_max`` (an in-place MAX all-reduce) the relative damping's
    row maximum. The rows ``[o, o + n)`` then come out as in a call on the whole tensors.
    """
    call = _bind(params, grads, exp_avgs, diags, offdiags, steps, halos, hyperparameters, skipped, grad_scale,
                 found_inf)
    return SONEW.run(call, lambda c: _sonew_reference(c, reduce, reduce_max),
                     lambda c: _launch(c, reduce, reduce_max))


def _launch(call: Call, reduce, reduce_max) -> torch.Tensor:
    """The Triton path of :func:`sonew_step` (module docstring, Kernels)."""
    params = call.tensors["params"]
    work = [p if p.is_contiguous() else p.contiguous() for p in params]
    columns = {**call.tensors, "params": work, "grads": [g.contiguous() for g in call.tensors["grads"]],
               "halos": [h if h is not None else d  # placeholder: no halo row exists, none is read
                         for h, d in zip(call.tensors["halos"], call.tensors["diags"])]}
    band = max([1] + [o.shape[0] for o in call.tensors["offdiags"]])
    has_relative = any(r.relative_eps for r in call.records)
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    device = call.device

    def run(config: Config) -> torch.Tensor:
        block, chunk = config["BLOCK"], config["CHUNK"]
        tiles = chunk // block
        directions = torch.empty(total, dtype=torch.float32, device=device).split(sizes)
        table = SONEW.table({**columns, "directions": directions}, call.records, chunk, device)
        clip = launch_global_norm(table, A.grads, 1, None, call.skipped, config, device, call.grad_scale,
                                  call.found_inf, reduce)
        if table.n_chunks == 0:  # this shard is empty: it still takes part in the collectives
            if has_relative and reduce_max is not None:
                reduce_max(torch.zeros(table.n, dtype=torch.float32, device=device))
            launch_segment_norms(table, torch.zeros((1, 2), device=device), clip, step_col=A.steps, reduce=reduce)
            return clip
        rec = (2 + band) * 2 * band
        snap = torch.empty((table.n_chunks * tiles + 1) * rec, dtype=torch.float32, device=device)

        def snapshots(lo):  # the tile records of chunks lo, lo + 1, ... (launches start at chunk lo)
            return snap[lo * tiles * rec:]

        launch_chunks(_sonew_halo_kernel, table, config, lambda lo, hi: (snapshots(lo),), BAND=band,
                      HALO=triton.next_power_of_2(2 * band))
        row_max = snap  # placeholder pointer when no tensor uses relative damping (never read)
        if has_relative:
            row_sums = torch.empty(table.n_chunks, dtype=torch.float32, device=device)
            launch_chunks(_sonew_row_sum_kernel, table, config, lambda lo, hi: (clip, snapshots(lo), row_sums[lo:hi]),
                          BAND=band)
            row_max = torch.empty(table.n, dtype=torch.float32, device=device)
            _segment_max_kernel[(table.n,)](row_sums, table.bounds, row_max, RBLOCK=REDUCE_BLOCK)
            if reduce_max is not None:
                reduce_max(row_max)
        partial = torch.empty((table.n_chunks, 2), dtype=torch.float32, device=device)
        launch_chunks(_sonew_direction_kernel, table, config,
                      lambda lo, hi: (clip, snapshots(lo), row_max, partial[lo:hi]), BAND=band,
                      HAS_RELATIVE=has_relative)
        norms = launch_segment_norms(table, partial, clip, step_col=A.steps, reduce=reduce)
        launch_chunks(_sonew_apply_kernel, table, config, lambda lo, hi: (clip, norms))
        return clip

    clip = SONEW_CONFIGS.launch(device=device, bucket=shape_bucket(total) + (band,), dtype=params[0].dtype,
                                run=run, restore=SONEW.restore(columns, call.skipped))
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)
    return clip


def _bind(params, grads, exp_avgs, diags, offdiags, steps, halos, hyperparameters, skipped, grad_scale,
          found_inf) -> Call:
    """:meth:`SONEW.bind` with each tensor's band read off its ``offdiags``; ValueError for a halo whose
    band is not the tensor's, or halo rows beyond the band or without a halo."""
    halos = [None] * len(params) if halos is None else list(halos)
    call = SONEW.bind((params, grads, exp_avgs, diags, offdiags, steps, halos), hyperparameters, skipped=skipped,
                      grad_scale=grad_scale, found_inf=found_inf,
                      from_tensors=lambda t: {"band": [o.shape[0] for o in t["offdiags"]]})
    for i, (h, r) in enumerate(zip(call.tensors["halos"], call.records)):
        b = 0 if h is None else h.shape[0] - 3
        if h is not None and b != r.band:
            raise ValueError(f"halos[{i}]: expected shape {(3 + int(r.band), 2 * int(r.band))} for band "
                             f"{int(r.band)} (offdiags[{i}]), got {tuple(h.shape)}")
        for name in ("halo_left", "halo_right"):
            value = getattr(r, name)
            if value != int(value) or not 0 <= value <= b:
                raise ValueError(f"{name}: expected an integer in [0, {b}] for tensor {i} "
                                 f"({'its halo has ' + str(b) + ' rows per side' if h is not None else 'no halo'}), "
                                 f"got {value!r}")
    return call


# ----------------------------------------------------------------------------- reference


def sparse_inverse_factors_reference(
    diag: torch.Tensor, offdiag: torch.Tensor, damping
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the LogDet-optimal banded sparse inverse ``X = L D L^T`` (module docstring).

    ``diag`` (n,) and ``offdiag`` (b, n) are the bias-corrected, undamped band statistics
    (``offdiag[j-1, i] = S_{i, i+j}``; entries ``i >= n - j`` are ignored); ``damping`` is added to the
    diagonal. Returns ``psi`` (n, b) (``L[k+p, k] = -psi[k, p-1]``) and ``dinv`` (n,) (``D``), computed
    in the inputs' dtype with the same elimination and edge-dropping rule as the kernel.
    """
    n, b = diag.shape[0], offdiag.shape[0]
    rows = torch.arange(n, device=diag.device)
    diag_d = diag + damping
    pad = torch.zeros(b, dtype=diag.dtype, device=diag.device)
    diag_pad = torch.cat([diag_d, pad])
    # off_pad[j-1][i] = S_{i, i+j}, 0 where i + j >= n or beyond the array
    off_pad = [torch.cat([torch.where(rows + j < n, offdiag[j - 1], 0), pad]) for j in range(1, b + 1)]
    exists = [rows + p < n for p in range(b + 1)]

    def window(p, q):  # S[k+p, k+q] for neighbours p, q >= 1 of every row k (identity where absent)
        if p == q:
            return torch.where(exists[p], diag_pad[p:p + n], 1)
        lo, hi = min(p, q), max(p, q)
        return torch.where(exists[hi], off_pad[hi - lo - 1][lo:lo + n], 0)

    A = [[window(p, q) for q in range(1, b + 1)] for p in range(1, b + 1)]
    s = [torch.where(exists[p], off_pad[p - 1][:n], 0) for p in range(1, b + 1)]
    c0 = diag_d
    c, c_kept = c0, c0
    alive = c0 > 0
    kept = torch.zeros(n, dtype=torch.long, device=diag.device)
    invs = []
    diag0 = [A[p][p] for p in range(b)]
    for p in range(b):
        piv_ok = A[p][p] > DROP_TOL * diag0[p]
        inv = 1 / torch.where(piv_ok, A[p][p], 1)
        c = c - s[p] * s[p] * inv
        alive = alive & piv_ok & (c > DROP_TOL * c0)
        c_kept = torch.where(alive, c, c_kept)
        kept = kept + alive.long()
        invs.append(inv)
        for q in range(p + 1, b):
            mult = A[p][q] * inv
            s[q] = s[q] - mult * s[p]
            for r in range(q, b):
                A[q][r] = A[q][r] - mult * A[p][r]
    psi = [torch.zeros_like(c0) for _ in range(b)]
    for p in reversed(range(b)):
        acc = s[p] - sum((A[p][q] * psi[q] for q in range(p + 1, b)), torch.zeros_like(c0))
        psi[p] = torch.where(p < kept, acc * invs[p], 0)
    psi = torch.stack(psi, dim=1) if b else torch.zeros((n, 0), dtype=diag.dtype, device=diag.device)
    return psi, 1 / c_kept


def apply_sparse_inverse_reference(psi: torch.Tensor, dinv: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``X v = L (D (L^T v))`` for the factors of :func:`sparse_inverse_factors_reference` (v flat)."""
    n, b = psi.shape
    z = v.clone()
    for p in range(1, min(b, n - 1) + 1):
        z[:-p] -= psi[:-p, p - 1] * v[p:]
    z = dinv * z
    x = z.clone()
    for p in range(1, min(b, n - 1) + 1):
        x[p:] -= psi[:-p, p - 1] * z[:-p]
    return x


def sonew_step_reference(params, grads, exp_avgs, diags, offdiags, steps, halos=None, *, skipped=None,
                         grad_scale=None, found_inf=None, reduce=None, reduce_max=None,
                         **hyperparameters) -> torch.Tensor:
    """Plain PyTorch SONew with :func:`sonew_step`'s arguments and contract (shards and halos included).

    Math in fp32, or float64 when the params are float64 (the tests' reference); the bias corrections
    ``1 - b^t`` always in float64 (they cancel: fp32 ``b^t`` would cost up to ~3e-8 / (1 - b) relative).
    """
    call = _bind(params, grads, exp_avgs, diags, offdiags, steps, halos, hyperparameters, skipped, grad_scale,
                 found_inf)
    return SONEW.run(call, lambda c: _sonew_reference(c, reduce, reduce_max), None)


def _with_halo(own: torch.Tensor, halo_row: torch.Tensor | None, left: int, right: int) -> torch.Tensor:
    """``own`` (flat) extended by the ``left`` halo rows before it and the ``right`` ones after it."""
    if halo_row is None:
        return own
    b = halo_row.shape[0] // 2
    return torch.cat([halo_row[b - left:b].to(own.dtype), own, halo_row[b:b + right].to(own.dtype)])


def _sonew_reference(call: Call, reduce, reduce_max) -> torch.Tensor:
    """The reference's math on a bound call: per tensor the statistics of its rows and of its existing
    halo rows (an extended tensor whose ends are those of the whole tensor or of the halo), the direction
    of its own rows, then the (reduced) norms and the update."""
    params, grads, exp_avgs, diags, offdiags, steps, halos = (call.tensors[a.name] for a in SONEW.tensors)
    clip = global_norm_reference(grads, None, call.skipped, call.grad_scale, call.found_inf, reduce)
    ok = clip[2] != 0
    records = [r.on_host() for r in call.records]
    stats = []
    for p, g, m, v, o, s, halo, h in zip(params, grads, exp_avgs, diags, offdiags, steps, halos, records):
        dtype = torch.promote_types(p.dtype, torch.float32)
        n, b, left, right = p.numel(), o.shape[0], int(h.halo_left), int(h.halo_right)
        rows = slice(left, left + n)  # the tensor's own rows in the extended one
        ext = (lambda q, own: _with_halo(own, None if halo is None else halo[q], left, right))
        g = ext(0, g.reshape(-1).to(dtype)) * clip[1].to(dtype)  # 1, or 1 / grad_scale
        t = s.to(torch.float64) + 1
        bc1, bc2 = (1 - h.beta1 ** t).to(dtype), (1 - h.beta2 ** t).to(dtype)
        mu = h.beta1 * ext(1, m.reshape(-1).to(dtype)) + (1 - h.beta1) * g
        nu = h.beta2 * ext(2, v.to(dtype)) + (1 - h.beta2) * g * g
        n_ext = mu.shape[0]
        off = torch.stack([ext(2 + j, o[j - 1].to(dtype)) for j in range(1, b + 1)]) if b else \
            torch.zeros((0, n_ext), dtype=dtype, device=mu.device)
        for j in range(1, min(b, n_ext - 1) + 1):
            off[j - 1, :-j] = h.beta2 * off[j - 1, :-j] + (1 - h.beta2) * g[:-j] * g[j:]
        row_max = torch.zeros((), dtype=dtype, device=mu.device)
        if h.relative_eps and n:
            row_sum = nu / bc2
            for j in range(1, min(b, n_ext - 1) + 1):
                row_sum[:-j] += (off[j - 1, :-j] / bc2).abs()
                row_sum[j:] += (off[j - 1, :-j] / bc2).abs()
            row_max = row_sum[rows].max()
        stats.append((dtype, rows, g, mu, nu, off, bc1, bc2, row_max))
    row_maxes = torch.stack([st[-1].to(torch.float64) for st in stats])
    if reduce_max is not None and any(h.relative_eps for h in records):
        reduce_max(row_maxes)
    steps_taken = []
    for (dtype, rows, g, mu, nu, off, bc1, bc2, _), row_max, h in zip(stats, row_maxes, records):
        nu_hat, off_hat, mu_hat = nu / bc2, off / bc2, mu / bc1
        damp = torch.clamp(h.eps * row_max.to(dtype), min=MIN_RELATIVE_DAMPING) if h.relative_eps else h.eps
        if h.precondition:
            d = apply_sparse_inverse_reference(*sparse_inverse_factors_reference(nu_hat, off_hat, damp), mu_hat)[rows]
        else:
            d = graft_vector_reference(GRAFTS["adam"], g[rows], mu_hat[rows], nu_hat[rows], h.graft_eps)
        steps_taken.append((d, graft_vector_reference(h.graft, g[rows], mu_hat[rows], nu_hat[rows], h.graft_eps)))
    norms = tensor_norms_reference([(d, torch.zeros_like(d) if a is None else a) for d, a in steps_taken], reduce)
    for p, m, v, o, s, h, (dtype, rows, _, mu, nu, off, *_), (d, graft), (d_norm, a_norm) in zip(
            params, exp_avgs, diags, offdiags, steps, records, stats, steps_taken, norms):
        w = p.reshape(-1).to(dtype)
        if graft is not None:
            d = d * graft_ratio_reference(a_norm, d_norm)
        w_new = w - h.lr * (d + h.weight_decay * w)
        m.copy_(torch.where(ok, mu[rows], m.reshape(-1).to(dtype)).view_as(m))
        v.copy_(torch.where(ok, nu[rows], v.to(dtype)))
        o.copy_(torch.where(ok, off[:, rows], o.to(dtype)))
        p.copy_(torch.where(ok, w_new, w).view_as(p))
        s.add_(ok.to(s.dtype))
    return clip
