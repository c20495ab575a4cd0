"""BASELINES, not kfopt: plain-PyTorch implementations that kfopt's kernels are measured against.

Each is written the way a careful user would write it without kfopt -- ``torch._foreach_*`` ops
over the whole list of tensors, no host synchronisation, math in fp32 -- so that a ratio against it
is a fair "what does the fused kernel buy". They implement the same math as the kfopt kernels
(checked against the kfopt references in every run of the suite), except that they do not skip a
step on non-finite gradients (that needs a ``torch.where`` over every tensor, which no user writes).

* ``lamb_foreach_update`` / ``ForeachLAMB``: LAMB (docs/lamb-lars.md) with global clipping.
* ``lars_foreach_update`` / ``ForeachLARS``: LARS with momentum.
* ``sonew_tridiagonal_foreach_update``: SONew with band 1 (tridiagonal), Adam grafting.
* ``graft_foreach_update``: Adam grafting of preconditioned directions (K-FAC's, MKOR's, SINGD's
  ``graft="adam"``; kfopt.kernels.graft), with a momentum buffer on each direction.
* the LAMB and SONew steps above compiled by ``torch.compile`` (inductor generates Triton kernels
  too): ``perf.cases.LambCompiledRunner`` / ``SonewCompiledRunner``, timed after their compilation.
* ``rank1_inverse_update_torch``: MKOR's Sherman-Morrison update of an inverse factor in two big
  ops (``torch.mv``, ``Tensor.addr_``) plus scalar ops on the device.
* ``covariance_matmul``: ``torch.matmul(x.T, x)`` (cuBLAS, full GEMM, output in x's dtype).
* ``structured_dense_matmul``: a structured factor applied as a dense ``torch.matmul``.
"""

from __future__ import annotations

from typing import Sequence

import torch

# ----------------------------------------------------------------------------- element-wise methods


def _adam_direction(g, exp_avgs, exp_avg_sqs, beta1, beta2, eps, step):
    """Adam's moments updated in place from ``g`` and its direction ``m^ / (sqrt(v^) + eps)`` (t = ``step``),
    with torch's foreach ops."""
    torch._foreach_lerp_(exp_avgs, g, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1.0 - beta2)
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2 ** 0.5)
    torch._foreach_add_(denom, eps)
    u = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(u, 1.0 / bc1)
    return u


def as_fp32(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors themselves when fp32, else fp32 copies."""
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def clip_coefficient(grads32: Sequence[torch.Tensor], max_grad_norm: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(||g_all||, min(1, max_grad_norm / ||g_all||)) as device tensors (coefficient 1 without clipping)."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads32)))
    if not max_grad_norm:
        return total, torch.ones_like(total)
    return total, torch.clamp(max_grad_norm / total, max=1.0)


def lamb_foreach_update(params, grads, exp_avgs, exp_avg_sqs, *, step: int | torch.Tensor, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float, adapt: bool,
                        clip_coef: torch.Tensor | None) -> None:
    """One LAMB step (t = ``step``, counting from 1) on lists of tensors with ``torch._foreach_*`` ops.

    ``exp_avgs``/``exp_avg_sqs`` fp32; params/grads fp32, bf16 or fp16 (fp32 copies are made).
    ``step`` may be a device tensor (what ``torch.compile`` needs to reuse one graph at every step).
    """
    w32, g = as_fp32(params), as_fp32(grads)
    g = torch._foreach_mul(g, clip_coef) if clip_coef is not None else g
    u = _adam_direction(g, exp_avgs, exp_avg_sqs, beta1, beta2, eps, step)
    if weight_decay:
        torch._foreach_add_(u, w32, alpha=weight_decay)
    if adapt:
        w_norm = torch.stack(torch._foreach_norm(w32))
        u_norm = torch.stack(torch._foreach_norm(u))
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(u, list((ratio * -lr).unbind()))
    else:
        torch._foreach_mul_(u, -lr)
    torch._foreach_add_(w32, u)
    if w32[0] is not params[0]:
        torch._foreach_copy_(params, w32)


def lars_foreach_update(params, grads, momentum_buffers, *, lr: float, momentum: float, weight_decay: float,
                        eta: float, adapt: bool, clip_coef: torch.Tensor | None) -> None:
    """One LARS step (docs/lamb-lars.md) with ``torch._foreach_*`` ops; buffers fp32."""
    w32, g = as_fp32(params), as_fp32(grads)
    d = torch._foreach_mul(g, clip_coef) if clip_coef is not None else [t.clone() for t in g]
    if weight_decay:
        torch._foreach_add_(d, w32, alpha=weight_decay)
    if adapt:
        w_norm = torch.stack(torch._foreach_norm(w32))
        d_norm = torch.stack(torch._foreach_norm(d))
        ratio = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm))
        torch._foreach_mul_(d, list((ratio * lr).unbind()))
    else:
        torch._foreach_mul_(d, lr)
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, d)
    torch._foreach_sub_(w32, momentum_buffers)
    if w32[0] is not params[0]:
        torch._foreach_copy_(params, w32)


def graft_foreach_update(params, grads, directions, exp_avgs, exp_avg_sqs, momentum_buffers, *,
                         step: int | torch.Tensor, lr: float, beta1: float, beta2: float, graft_eps: float,
                         weight_decay: float, momentum: float) -> None:
    """One Adam-grafted step (kfopt.kernels.graft's docstring) with ``torch._foreach_*`` ops, every tensor
    preconditioned with a momentum buffer: AdamW's moments and direction ``a`` from the raw gradient,
    ``buf <- momentum buf + P``, ``w <- w - lr ((||a|| / ||buf||) buf + weight_decay w)``; t = ``step``
    (counting from 1). State fp32; params/grads/directions fp32, bf16 or fp16."""
    w32, g, d = as_fp32(params), as_fp32(grads), as_fp32(directions)
    a = _adam_direction(g, exp_avgs, exp_avg_sqs, beta1, beta2, graft_eps, step)
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, d)
    a_norm = torch.stack(torch._foreach_norm(a))
    q_norm = torch.stack(torch._foreach_norm(momentum_buffers))
    scale = torch.where(q_norm > 0, a_norm / torch.where(q_norm > 0, q_norm, 1.0), 0.0)
    update = torch._foreach_mul(momentum_buffers, list((scale * -lr).unbind()))
    if weight_decay:
        torch._foreach_add_(update, w32, alpha=-lr * weight_decay)
    torch._foreach_add_(w32, update)
    if w32[0] is not params[0]:
        torch._foreach_copy_(params, w32)


def sonew_tridiagonal_foreach_update(params, grads, exp_avgs, diags, offdiags, *, step: int | torch.Tensor, lr: float,
                                     beta1: float,
                                     beta2: float, eps: float, weight_decay: float, graft_eps: float,
                                     drop_tol: float) -> None:
    """One SONew step (docs/sonew.md, kfopt.kernels.sonew's docstring) with band 1 and Adam
    grafting, t = ``step`` (counting from 1; an int or a device tensor), with ``torch._foreach_*`` ops over
    the flattened tensors.

    ``offdiags[i]``: (1, n) (``offdiags[i][0, k]`` the EMA of ``g_k g_{k+1}``) for a preconditioned
    tensor, (0, n) for one that gets plain Adam (vectors). State fp32; params/grads any float dtype.
    Tridiagonal sparse inverse in closed form: ``psi_k = S_{k,k+1} / S_{k+1,k+1}``, ``c_k = S_kk -
    S_{k,k+1} psi_k``, the edge dropped (``psi_k = 0``, ``c_k = S_kk``) unless ``c_k > drop_tol S_kk``;
    ``x = L D L^T mu^`` by two shifted multiply-adds. The edge rule is the one step without a foreach
    form (a ``torch.where`` per tensor).
    """
    w32 = as_fp32(params)
    w = [t.view(-1) for t in w32]
    g = [t.reshape(-1) for t in as_fp32(grads)]
    mu = [m.view(-1) for m in exp_avgs]
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    torch._foreach_lerp_(mu, g, 1.0 - beta1)
    torch._foreach_mul_(diags, beta2)
    torch._foreach_addcmul_(diags, g, g, value=1.0 - beta2)
    tri = [i for i, o in enumerate(offdiags) if o.shape[0] == 1 and o.shape[1] > 1]
    off = [offdiags[i][0, :-1] for i in tri]
    torch._foreach_mul_(off, beta2)
    torch._foreach_addcmul_(off, [g[i][:-1] for i in tri], [g[i][1:] for i in tri], value=1.0 - beta2)
    mu_hat = torch._foreach_div(mu, bc1)
    nu_hat = torch._foreach_div(diags, bc2)
    denom = torch._foreach_sqrt(nu_hat)
    torch._foreach_add_(denom, graft_eps)
    d = list(torch._foreach_div(mu_hat, denom))  # Adam: the graft, and the direction of unpreconditioned tensors
    if tri:
        s = torch._foreach_add([nu_hat[i] for i in tri], eps)  # damped diagonal S_kk
        s_k, s_next = [x[:-1] for x in s], [x[1:] for x in s]
        o_hat = torch._foreach_div(off, bc2)  # S_{k,k+1}
        psi = torch._foreach_div(o_hat, s_next)
        c = torch._foreach_sub(s_k, torch._foreach_mul(o_hat, psi))
        keep = [ci > drop_tol * sk for ci, sk in zip(c, s_k)]
        psi = [torch.where(k, p, 0.0) for k, p in zip(keep, psi)]
        dinv = torch._foreach_reciprocal(s)
        torch._foreach_copy_([x[:-1] for x in dinv], torch._foreach_reciprocal(
            [torch.where(k, ci, sk) for k, ci, sk in zip(keep, c, s_k)]))
        m_hat = [mu_hat[i] for i in tri]
        y = [m.clone() for m in m_hat]
        torch._foreach_addcmul_([x[:-1] for x in y], psi, [m[1:] for m in m_hat], value=-1.0)  # L^T mu^
        z = torch._foreach_mul(y, dinv)  # D L^T mu^
        x = [t.clone() for t in z]
        torch._foreach_addcmul_([t[1:] for t in x], psi, [t[:-1] for t in z], value=-1.0)  # L D L^T mu^
        graft_norm = torch.stack(torch._foreach_norm([d[i] for i in tri]))
        x_norm = torch.stack(torch._foreach_norm(x))
        scale = torch.where(x_norm > 0, graft_norm / torch.where(x_norm > 0, x_norm, 1.0), 0.0)
        torch._foreach_mul_(x, list(scale.unbind()))
        for i, xi in zip(tri, x):
            d[i] = xi
    if weight_decay:
        torch._foreach_add_(d, w, alpha=weight_decay)
    torch._foreach_add_(w, d, alpha=-lr)
    if w32[0] is not params[0]:
        torch._foreach_copy_(params, w32)


class ForeachLAMB(torch.optim.Optimizer):
    """BASELINE: LAMB as a ``torch.optim.Optimizer`` on ``lamb_foreach_update`` (kfopt.LAMB's semantics:
    global clipping over all groups, trust ratio where ``weight_decay != 0``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        with_grad = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            return None
        _, coef = clip_coefficient(as_fp32([p.grad for _, p in with_grad]), self.max_grad_norm)
        self.steps += 1
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    self.state[p]["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            lamb_foreach_update(ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps],
                                [self.state[p]["exp_avg_sq"] for p in ps], step=self.steps, lr=group["lr"],
                                beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                                weight_decay=group["weight_decay"], adapt=group["weight_decay"] != 0,
                                clip_coef=coef)
        return None


class ForeachLARS(torch.optim.Optimizer):
    """BASELINE: LARS as a ``torch.optim.Optimizer`` on ``lars_foreach_update`` (kfopt.LARS's semantics)."""

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, eta=0.001, always_adapt=False,
                 max_grad_norm=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      always_adapt=always_adapt))
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not with_grad:
            return None
        coef = None
        if self.max_grad_norm:
            coef = clip_coefficient(as_fp32([p.grad for p in with_grad]), self.max_grad_norm)[1]
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            lars_foreach_update(ps, [p.grad for p in ps], [self.state[p]["momentum_buffer"] for p in ps],
                                lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                                eta=group["eta"], adapt=group["weight_decay"] != 0 or group["always_adapt"],
                                clip_coef=coef)
        return None


# ----------------------------------------------------------------------------- factor kernels


def covariance_matmul(x: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(x.T, x)``: the full GEMM cuBLAS runs for a covariance (no scaling, x's dtype)."""
    return torch.matmul(x.T, x)


def rank1_inverse_update_torch(inverses: Sequence[torch.Tensor], vectors: Sequence[torch.Tensor], gamma: float) -> None:
    """MKOR's update of each inverse factor J (symmetric) by its vector v, in place, per layer::

        J <- (1/gamma) [J - c (J v)(J v)^T / (1 + c v^T J v)],   c = (1 - gamma) / gamma

    as the two big ops a PyTorch user writes (``u = torch.mv(J, v)``; ``J.addr_(u, w)``), the scalar
    ``c / (1 + c v^T u)`` kept on the device. Traffic: J read twice, written once (3 d^2 elements).
    """
    c = (1.0 - gamma) / gamma
    for J, v in zip(inverses, vectors):
        u = torch.mv(J, v)
        w = u * (c / (1.0 + c * torch.dot(v, u)))
        J.addr_(u, w, beta=1.0 / gamma, alpha=-1.0 / gamma)


def rank1_inverse_update_exact(J: torch.Tensor, v: torch.Tensor, gamma: float) -> torch.Tensor:
    """The same update in float64, out of place (the correctness reference)."""
    J, v = J.double(), v.double()
    c = (1.0 - gamma) / gamma
    u = J @ v
    return (J - c * torch.outer(u, u) / (1.0 + c * (v @ u))) / gamma


def structured_dense_matmul(factor_dense: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A structured factor (block-diagonal, triangular, ...) applied as a dense ``torch.matmul``."""
    return torch.matmul(factor_dense, x)
