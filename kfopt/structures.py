r"""Structured square matrices for SINGD's factors ``K``, ``C`` and their momenta: each stores only its
free parameters and computes with kfopt's structured kernels, never with a dense d x d intermediate
(except the dense and triangular structures, whose own size is O(d^2)).

Structures and names (``parse_structure``; the reference package's names and kfopt's own)
==========================================================================================

* ``"dense"``: any matrix; tensor ``mat`` (d, d).
* ``"diagonal"``: ``diag(k)``; ``diag`` (d).
* ``"block{b}diagonal"`` (the reference's ``"block30diagonal"``, any b >= 1): ``diag(B_0, .., B_{n-1}, L)``
  with n = d // b blocks of side b and a last block L of side d - n b < b; ``blocks`` (n, b, b) and
  ``last`` (d - n b, d - n b).
* ``"tril"`` / ``"triu"``: lower-triangular ``T`` / upper-triangular ``T^T``; ``packed`` (d (d + 1) / 2),
  ``T`` packed by rows (``kernels.triangular``).
* ``"triltoeplitz"``: lower-triangular Toeplitz ``L[i, j] = c[i - j]`` (i >= j); ``coeffs`` (d) = c.
  ``"triutoeplitz"``: its transpose ``L^T`` (``U[i, j] = c[j - i]``, j >= i); ``coeffs`` (d).
* ``"hierarchical{k1}_{k2}"`` (the reference's ``"hierarchical15_15"``): ``[[A, B1, B2], [0, diag(c), 0],
  [0, D, E]]``; ``A`` (k1', k1'), ``B = [B1 | B2]`` (k1', d - k1'), ``C`` = c (m), ``D`` (k2', m),
  ``E`` (k2', k2').

Hierarchical sizes follow the reference: ``d <= k1``: only A (k1' = d); ``k1 < d <= k1 + k2``: A and E
(k2' = d - k1); otherwise k1' = k1, k2' = k2 and a diagonal middle of m = d - k1 - k2. Every structure
contains the identity and is closed under products (a group, as SINGD needs: ``K (I - b m)`` stays in it).

The projection ``Proj``
=======================
SINGD updates a factor with ``Proj(M)`` of a symmetric d x d ``M`` (``from_dense``): every free entry
``(i, j)`` gets ``M[i, j]``, plus ``M[j, i]`` when its mirror ``(j, i)`` is not free (e.g. ``2 M[i, j]``
below the diagonal of a triangular structure, in the strips B and D of a hierarchical matrix); entries
outside the structure are dropped. Toeplitz structures have one parameter per diagonal: ``c[0] =
tr(M) / d`` and ``c[k] = (sum_i M[i + k, i] + sum_i M[i, i + k]) / (d - k)`` for k >= 1 (the mean of the
two diagonals' sums over the diagonal's length). This is the reference package's ``from_dense``.

Operations (every structure)
============================
* ``matmul(x, transpose=False, right=False)``: ``op(S) x`` or ``x op(S)`` for a dense x, ``op(S) = S`` or
  ``S^T``; fp32 result (float64 for float64 operands), fp32 accumulation for bf16/fp16 operands.
* ``from_inner(x=None, ones_column=False, scale=1.0)``: ``scale * Proj((a S)^T (a S))`` for the rows
  ``x`` (rows x d, or rows x (d - 1) with ``ones_column``, then ``a = [x | 1]``), or ``Proj(S^T S)``
  when x is None. A new structure in fp32 (float64 for float64 inputs). Per structure (``S`` as a
  matrix, ``G = a^T a``): dense ``S^T G S``, or ``(a S)^T (a S)`` when rows < d (the cheaper order);
  diagonal ``k^2 * colsum(a^2)``; block-diagonal per block ``B_i^T G_ii B_i`` from the per-block Gram
  matrices ``G_ii`` (``kernels.block_covariance``), never G; triangular ``Proj`` of the dense inner
  product, with triangular products; Toeplitz: ``P = a S`` (rows x d) then the projection from the
  lag sums of ``P`` (``kernels.lag_sums``): c[0] = l[0] / d, c[k] = 2 l[k] / (d - k);
  with x = None the lag sums of ``S^T S`` are ``l[k] = sum_s (d - k - s) c[s] c[s + k]`` (a weighted
  autocorrelation of c, O(d) memory); hierarchical: ``P = a S``, then the blocks of ``P^T P``.
* ``compose(other)``: the product ``self @ other`` of two structures of the same kind and size (exact:
  the structures are closed under products), fp32 (float64) result.
* ``trace()``, ``average_trace()`` (= trace / d), ``abs_max()`` (largest |free parameter|), in-place
  ``add_(other, alpha)``, ``mul_(value)``, ``diag_add_(value)``, ``copy_(other)`` (values may be numbers
  or 0-d tensors: no host synchronisation), ``to(dtype)``, ``clone()``, ``to_dense()``.
* ``spec.eye(d)``, ``spec.zeros(d)``, ``spec.from_dense(M)``, ``spec.from_tensors(d, tensors)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from kfopt.kernels.block_diagonal import block_covariance, block_diagonal_matmul
from kfopt.kernels.covariance import symmetric_covariance
from kfopt.kernels.diagonal_scaling import diagonal_from_inner, diagonal_matmul
from kfopt.kernels.hierarchical_products import hierarchical_matmul
from kfopt.kernels.structured import result_dtype
from kfopt.kernels.toeplitz import lag_sums, toeplitz_matmul
from kfopt.kernels.triangular import pack_lower, triangular_matmul, unpack_lower

Scalar = float | torch.Tensor


def _axpy_(t: torch.Tensor, o: torch.Tensor, alpha: Scalar) -> None:
    """``t += alpha * o`` in place (alpha a number or a 0-d tensor)."""
    if isinstance(alpha, torch.Tensor):
        t.addcmul_(o, alpha)
    else:
        t.add_(o, alpha=alpha)


def _rows_with_ones(x: torch.Tensor, ones_column: bool) -> torch.Tensor:
    """``[x | 1]`` (a copy) or x."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if ones_column else x


def _dense_covariance(x: torch.Tensor, ones_column: bool, scale: float) -> torch.Tensor:
    """``scale * a^T a`` with ``a = [x | 1]`` (fp32, float64 for float64 x), exactly symmetric."""
    d = x.shape[1] + ones_column
    if x.shape[0] == 0:
        return torch.zeros(d, d, dtype=result_dtype(x), device=x.device)
    return symmetric_covariance(x, ones_column).mul_(x.shape[0] * scale)


def _dense_inner(s: "Structure", x: torch.Tensor, ones_column: bool, scale: float) -> torch.Tensor:
    """``scale * (a S)^T (a S)`` as a dense matrix, in the cheaper order: ``P = a S`` then ``P^T P`` when
    rows < d (2 rows d^2 flops), else ``S^T (a^T a) S`` (2 d^3 flops)."""
    if 0 < x.shape[0] < s.dim:
        return _dense_covariance(s.matmul(_rows_with_ones(x, ones_column), right=True), False, scale)
    gram = _dense_covariance(x, ones_column, scale)
    return s.matmul(s.matmul(gram, transpose=True), right=True)


class Structure:
    """A d x d matrix stored by its free parameters (module docstring). Subclasses define the math."""

    #: names of the free-parameter tensors, in ``tensors`` order
    names: ClassVar[tuple[str, ...]]

    def __init__(self, spec: "StructureSpec", dim: int, tensors: list[torch.Tensor]):
        self.spec = spec
        self.dim = dim
        self.tensors = tensors

    # -- generic -----------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))

    def _new(self, tensors: list[torch.Tensor]) -> "Structure":
        return type(self)(self.spec, self.dim, tensors)

    def to(self, dtype: torch.dtype) -> "Structure":
        """This structure in ``dtype`` (itself when it already has it)."""
        return self if dtype == self.dtype else self._new([t.to(dtype) for t in self.tensors])

    def clone(self) -> "Structure":
        return self._new([t.clone() for t in self.tensors])

    def copy_(self, other: "Structure") -> "Structure":
        for t, o in zip(self.tensors, other.tensors):
            t.copy_(o)
        return self

    def mul_(self, value: Scalar) -> "Structure":
        for t in self.tensors:
            t.mul_(value)
        return self

    def add_(self, other: "Structure", alpha: Scalar = 1.0) -> "Structure":
        for t, o in zip(self.tensors, other.tensors):
            _axpy_(t, o, alpha)
        return self

    def abs_max(self) -> torch.Tensor:
        """Largest absolute free parameter (0-d; 0 for an empty structure)."""
        parts = [t.abs().amax() for t in self.tensors if t.numel()]
        return torch.stack(parts).amax() if parts else torch.zeros((), dtype=self.dtype, device=self.device)

    def average_trace(self) -> torch.Tensor:
        return self.trace() / self.dim

    def _math_dtype(self, *others: torch.Tensor) -> torch.dtype:
        return result_dtype(self.tensors[0], *others)

    # -- per structure -----------------------------------------------------------------------

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, transpose: bool = False, right: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def from_inner(self, x: torch.Tensor | None = None, ones_column: bool = False,
                   scale: float = 1.0) -> "Structure":
        raise NotImplementedError

    def compose(self, other: "Structure") -> "Structure":
        raise NotImplementedError

    def trace(self) -> torch.Tensor:
        raise NotImplementedError

    def diag_add_(self, value: Scalar) -> "Structure":
        raise NotImplementedError


class Dense(Structure):
    names = ("mat",)

    def to_dense(self) -> torch.Tensor:
        return self.tensors[0]

    def matmul(self, x, transpose=False, right=False):
        dtype = self._math_dtype(x)
        m = self.tensors[0].to(dtype)
        m = m.T if transpose else m
        return x.to(dtype) @ m if right else m @ x.to(dtype)

    def from_inner(self, x=None, ones_column=False, scale=1.0):
        if x is None:
            return self._new([self.matmul(self.tensors[0], transpose=True)])
        return self._new([_dense_inner(self, x, ones_column, scale)])

    def compose(self, other):
        return self._new([self.matmul(other.tensors[0])])

    def trace(self):
        return self.tensors[0].diagonal().sum(dtype=self._math_dtype())

    def diag_add_(self, value):
        self.tensors[0].diagonal().add_(value)
        return self


class Diagonal(Structure):
    names = ("diag",)

    def to_dense(self) -> torch.Tensor:
        return torch.diag(self.tensors[0])

    def matmul(self, x, transpose=False, right=False):
        return diagonal_matmul(self.tensors[0], x, right)

    def from_inner(self, x=None, ones_column=False, scale=1.0):
        k = self.tensors[0]
        if x is None:
            return self._new([k.to(self._math_dtype()).square()])
        return self._new([diagonal_from_inner(k, x, ones_column, scale)])

    def compose(self, other):
        dtype = self._math_dtype(other.tensors[0])
        return self._new([self.tensors[0].to(dtype) * other.tensors[0].to(dtype)])

    def trace(self):
        return self.tensors[0].sum(dtype=self._math_dtype())

    def diag_add_(self, value):
        self.tensors[0].add_(value)
        return self


class BlockDiagonal(Structure):
    names = ("blocks", "last")

    @property
    def split(self) -> int:
        """Side of the part covered by whole blocks (n b)."""
        return self.tensors[0].shape[0] * self.spec.block

    def to_dense(self) -> torch.Tensor:
        return torch.block_diag(*self.tensors[0], self.tensors[1])

    def matmul(self, x, transpose=False, right=False):
        blocks, last = self.tensors
        out = torch.empty(x.shape, dtype=self._math_dtype(x), device=x.device)
        s = self.split
        if right:
            block_diagonal_matmul(blocks, x[:, :s], transpose, right, out=out[:, :s])
            block_diagonal_matmul(last[None], x[:, s:], transpose, right, out=out[:, s:])
        else:
            block_diagonal_matmul(blocks, x[:s], transpose, right, out=out[:s])
            block_diagonal_matmul(last[None], x[s:], transpose, right, out=out[s:])
        return out

    def _per_block(self, fn) -> list[torch.Tensor]:
        """``[fn(blocks), fn(last[None])[0]]``: a batched-block function applied to both parts."""
        blocks, last = self.tensors
        return [fn(blocks, 0), fn(last[None], 1)[0]]

    def from_inner(self, x=None, ones_column=False, scale=1.0):
        blocks, last = self.tensors
        if x is None:
            return self._new(self._per_block(lambda b, _: block_diagonal_matmul(b, b, transpose=True)))
        gram = block_covariance(x, self.spec.block, ones_column, scale)
        n, r = blocks.shape[0], last.shape[0]
        grams = [gram[:n], gram[n:n + 1, :r, :r] if r else gram.new_zeros(1, 0, 0)]

        def congruence(b, part):  # B_i^T G_i B_i
            return block_diagonal_matmul(b, block_diagonal_matmul(b, grams[part], transpose=True), right=True)

        return self._new(self._per_block(congruence))

    def compose(self, other):
        blocks, last = other.tensors
        return self._new([block_diagonal_matmul(self.tensors[0], blocks),
                          block_diagonal_matmul(self.tensors[1][None], last[None])[0]])

    def trace(self):
        dtype = self._math_dtype()
        blocks, last = self.tensors
        return blocks.diagonal(dim1=1, dim2=2).sum(dtype=dtype) + last.diagonal().sum(dtype=dtype)

    def diag_add_(self, value):
        self.tensors[0].diagonal(dim1=1, dim2=2).add_(value)
        self.tensors[1].diagonal().add_(value)
        return self


class Triangular(Structure):
    names = ("packed",)

    def to_dense(self) -> torch.Tensor:
        t = unpack_lower(self.tensors[0])
        return t.T if self.spec.upper else t

    def matmul(self, x, transpose=False, right=False):
        return triangular_matmul(self.tensors[0], x, transpose != self.spec.upper, right)

    def from_inner(self, x=None, ones_column=False, scale=1.0):
        inner = self.matmul(self.to_dense(), transpose=True) if x is None else _dense_inner(self, x, ones_column, scale)
        return self._new([_pack_projection(inner)])

    def compose(self, other):
        product = self.matmul(other.to_dense())
        return self._new([pack_lower(product.T if self.spec.upper else product)])

    def _diagonal_index(self) -> torch.Tensor:
        i = torch.arange(self.dim, device=self.device)
        return i * (i + 1) // 2 + i

    def trace(self):
        return self.tensors[0][self._diagonal_index()].sum(dtype=self._math_dtype())

    def diag_add_(self, value):
        self.tensors[0][self._diagonal_index()] += value
        return self


def _pack_projection(m: torch.Tensor) -> torch.Tensor:
    """Triangular ``Proj(M)`` stored as a row-packed lower ``T``: ``T[i, j] = M[i, j] + M[j, i]`` below
    the diagonal, ``M[i, i]`` on it (for an upper structure ``T = Proj(M)^T``: the same numbers)."""
    both = m + m.T
    both.diagonal().copy_(m.diagonal())
    return pack_lower(both)


class Toeplitz(Structure):
    names = ("coeffs",)

    def to_dense(self) -> torch.Tensor:
        c = self.tensors[0]
        i = torch.arange(self.dim, device=c.device)
        lag = i[:, None] - i[None, :]
        dense = torch.where(lag >= 0, c[lag.clamp(min=0)], 0)
        return dense.T if self.spec.upper else dense

    def matmul(self, x, transpose=False, right=False):
        return toeplitz_matmul(self.tensors[0], x, transpose != self.spec.upper, right)

    def _from_lags(self, lags: torch.Tensor, scale: float) -> "Structure":
        """Toeplitz ``Proj`` from ``lags[k] = sum_i M[i, i + k]`` of a symmetric M (module docstring)."""
        d = self.dim
        weights = 2.0 * scale / torch.arange(d, 0, -1, dtype=lags.dtype, device=lags.device)
        weights[0] = scale / d
        return self._new([lags * weights])

    def from_inner(self, x=None, ones_column=False, scale=1.0):
        c = self.tensors[0]
        d = self.dim
        if x is None:
            dtype = self._math_dtype()
            cd = c.to(dtype)
            weighted = torch.arange(d, 0, -1, dtype=dtype, device=c.device) * cd
            return self._from_lags(lag_sums(cd[None], weighted[None]), 1.0)
        if x.shape[0] == 0:
            return self._new([torch.zeros(d, dtype=self._math_dtype(x), device=x.device)])
        product = self.matmul(_rows_with_ones(x, ones_column), right=True)
        return self._from_lags(lag_sums(product), scale)

    def compose(self, other):
        # L(c) L(e) = L(L(c) e) and (L(e) L(c))^T likewise: triangular Toeplitz matrices commute
        return self._new([toeplitz_matmul(self.tensors[0], other.tensors[0][:, None])[:, 0]])

    def trace(self):
        return self.tensors[0][0].to(self._math_dtype()) * self.dim

    def average_trace(self):
        return self.tensors[0][0].to(self._math_dtype())

    def diag_add_(self, value):
        self.tensors[0][:1].add_(value)
        return self


class Hierarchical(Structure):
    names = ("A", "B", "C", "D", "E")

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(k1', m, k2'): sides of A, of the diagonal middle and of E."""
        a, _, c, _, e = self.tensors
        return a.shape[0], c.shape[0], e.shape[0]

    def to_dense(self) -> torch.Tensor:
        a, b, c, dd, e = self.tensors
        k1, m, _ = self.sizes
        out = torch.zeros(self.dim, self.dim, dtype=a.dtype, device=a.device)
        out[:k1, :k1] = a
        out[:k1, k1:] = b
        out[k1:k1 + m, k1:k1 + m] = torch.diag(c)
        out[k1 + m:, k1:k1 + m] = dd
        out[k1 + m:, k1 + m:] = e
        return out

    def matmul(self, x, transpose=False, right=False):
        return hierarchical_matmul(*self.tensors, x, transpose, right)

    def from_inner(self, x=None, ones_column=False, scale=1.0):
        k1, m, _ = self.sizes
        if x is None:
            dtype = self._math_dtype()
            a, b, c, dd, e = (t.to(dtype) for t in self.tensors)
            b1, b2 = b[:, :m], b[:, m:]
            return self._new([a.T @ a, 2 * a.T @ b, c.square() + b1.square().sum(0) + dd.square().sum(0),
                              2 * (b2.T @ b1 + e.T @ dd), e.T @ e + b2.T @ b2])
        p = self.matmul(_rows_with_ones(x, ones_column), right=True)
        pa, pc, pe = p[:, :k1], p[:, k1:k1 + m], p[:, k1 + m:]
        return self._new([scale * (pa.T @ pa), (2 * scale) * (pa.T @ p[:, k1:]), scale * pc.square().sum(0),
                          (2 * scale) * (pe.T @ pc), scale * (pe.T @ pe)])

    def compose(self, other):
        dtype = self._math_dtype(other.tensors[0])
        a, b, c, dd, e = (t.to(dtype) for t in self.tensors)
        a2, b2, c2, d2, e2 = (t.to(dtype) for t in other.tensors)
        m = c.shape[0]
        top = torch.cat([a @ b2[:, :m] + b[:, :m] * c2 + b[:, m:] @ d2, a @ b2[:, m:] + b[:, m:] @ e2], dim=1)
        return self._new([a @ a2, top, c * c2, dd * c2 + e @ d2, e @ e2])

    def trace(self):
        dtype = self._math_dtype()
        a, _, c, _, e = self.tensors
        return a.diagonal().sum(dtype=dtype) + c.sum(dtype=dtype) + e.diagonal().sum(dtype=dtype)

    def diag_add_(self, value):
        a, _, c, _, e = self.tensors
        a.diagonal().add_(value)
        c.add_(value)
        e.diagonal().add_(value)
        return self


_PATTERNS = (
    (re.compile(r"dense"), "dense"),
    (re.compile(r"diagonal"), "diagonal"),
    (re.compile(r"block(\d+)diagonal"), "block_diagonal"),
    (re.compile(r"tril"), "tril"),
    (re.compile(r"triu"), "triu"),
    (re.compile(r"triltoeplitz"), "triltoeplitz"),
    (re.compile(r"triutoeplitz"), "triutoeplitz"),
    (re.compile(r"hierarchical(\d+)_(\d+)"), "hierarchical"),
)

_CLASSES = {"dense": Dense, "diagonal": Diagonal, "block_diagonal": BlockDiagonal, "tril": Triangular,
            "triu": Triangular, "triltoeplitz": Toeplitz, "triutoeplitz": Toeplitz, "hierarchical": Hierarchical}

#: the names ``parse_structure`` accepts (b, k1, k2: integers >= 1)
STRUCTURE_NAMES = ("dense", "diagonal", "block{b}diagonal", "tril", "triu", "triltoeplitz", "triutoeplitz",
                   "hierarchical{k1}_{k2}")


@dataclass(frozen=True)
class StructureSpec:
    """A structure kind with its sizes (block side, hierarchical corners); builds structures of any d."""

    kind: str
    block: int = 0
    k1: int = 0
    k2: int = 0

    @property
    def name(self) -> str:
        if self.kind == "block_diagonal":
            return f"block{self.block}diagonal"
        if self.kind == "hierarchical":
            return f"hierarchical{self.k1}_{self.k2}"
        return self.kind

    @property
    def upper(self) -> bool:
        """Upper triangular (``triu``, ``triutoeplitz``): stored as the transpose of a lower one."""
        return self.kind in ("triu", "triutoeplitz")

    @property
    def cls(self) -> type[Structure]:
        return _CLASSES[self.kind]

    def shapes(self, dim: int) -> list[tuple[int, ...]]:
        """Shapes of the free-parameter tensors of a d x d structure."""
        if self.kind == "dense":
            return [(dim, dim)]
        if self.kind in ("diagonal", "triltoeplitz", "triutoeplitz"):
            return [(dim,)]
        if self.kind == "block_diagonal":
            n, r = divmod(dim, self.block)
            return [(n, self.block, self.block), (r, r)]
        if self.kind in ("tril", "triu"):
            return [(dim * (dim + 1) // 2,)]
        k1, m, k2 = self.hierarchical_sizes(dim)
        return [(k1, k1), (k1, m + k2), (m,), (k2, m), (k2, k2)]

    def hierarchical_sizes(self, dim: int) -> tuple[int, int, int]:
        """(k1', m, k2') of a d x d hierarchical structure (module docstring)."""
        if dim <= self.k1:
            return dim, 0, 0
        if dim <= self.k1 + self.k2:
            return self.k1, 0, dim - self.k1
        return self.k1, dim - self.k1 - self.k2, self.k2

    def from_tensors(self, dim: int, tensors: list[torch.Tensor]) -> Structure:
        """The structure whose free parameters are ``tensors`` (used as they are, not copied)."""
        shapes = self.shapes(dim)
        if len(tensors) != len(shapes) or any(tuple(t.shape) != s for t, s in zip(tensors, shapes)):
            raise ValueError(f"{self.name} of side {dim}: expected tensors of shapes {shapes}, got "
                             f"{[tuple(t.shape) for t in tensors]}")
        return self.cls(self, dim, list(tensors))

    def zeros(self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Structure:
        return self.from_tensors(dim, [torch.zeros(s, dtype=dtype, device=device) for s in self.shapes(dim)])

    def eye(self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Structure:
        return self.zeros(dim, dtype, device).diag_add_(1.0)

    def from_dense(self, m: torch.Tensor) -> Structure:
        """``Proj(M)`` of a square matrix (module docstring), in M's dtype."""
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"m: expected a square matrix, got shape {tuple(m.shape)}")
        dim = m.shape[0]
        if self.kind == "dense":
            return self.from_tensors(dim, [m.clone()])
        if self.kind == "diagonal":
            return self.from_tensors(dim, [m.diagonal().clone()])
        if self.kind == "block_diagonal":
            n, r = divmod(dim, self.block)
            b = self.block
            blocks = torch.stack([m[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(n)]) if n else \
                m.new_zeros(0, b, b)
            return self.from_tensors(dim, [blocks, m[n * b:, n * b:].clone()])
        if self.kind in ("tril", "triu"):
            return self.from_tensors(dim, [_pack_projection(m)])
        if self.kind in ("triltoeplitz", "triutoeplitz"):
            sums = torch.stack([m.diagonal(-k).sum() + m.diagonal(k).sum() for k in range(dim)])
            sums[0] = m.diagonal().sum()
            return self.from_tensors(dim, [sums / torch.tensor([dim] + list(range(dim - 1, 0, -1)), dtype=m.dtype,
                                                                     device=m.device)])
        k1, mid, _ = self.hierarchical_sizes(dim)
        s = k1 + mid
        return self.from_tensors(dim, [m[:k1, :k1].clone(), m[:k1, k1:] + m[k1:, :k1].T,
                                       m.diagonal()[k1:s].clone(), m[s:, k1:s] + m[k1:s, s:].T, m[s:, s:].clone()])


def parse_structure(name: str) -> StructureSpec:
    """The :class:`StructureSpec` of a structure name (see ``STRUCTURE_NAMES``); ValueError otherwise."""
    if isinstance(name, str):
        for pattern, kind in _PATTERNS:
            match = pattern.fullmatch(name)
            if match:
                sizes = [int(g) for g in match.groups()]
                if any(s < 1 for s in sizes):
                    break
                if kind == "block_diagonal":
                    return StructureSpec(kind, block=sizes[0])
                if kind == "hierarchical":
                    return StructureSpec(kind, k1=sizes[0], k2=sizes[1])
                return StructureSpec(kind)
    raise ValueError(f"unknown structure {name!r}: expected one of {', '.join(STRUCTURE_NAMES)} "
                     "(b, k1, k2 integers >= 1)")
