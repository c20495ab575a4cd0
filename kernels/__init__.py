"""kfopt.kernels: Triton kernels with their PyTorch references (see ``dispatch`` for routing)."""

from .block_diagonal import (
    block_covariance,
    block_covariance_reference,
    block_diagonal_matmul,
    block_diagonal_matmul_reference,
)
from .covariance import symmetric_covariance, symmetric_covariance_reference
from .diagonal_scaling import (
    diagonal_from_inner,
    diagonal_from_inner_reference,
    diagonal_matmul,
    diagonal_matmul_reference,
)
from .dispatch import INTERPRETER, KERNEL_DTYPES, backend_override, use_triton
from .eigen_basis import eigen_precondition, eigen_precondition_reference
from .graft import graft_step, graft_step_reference
from .hierarchical_products import hierarchical_matmul, hierarchical_matmul_reference
from .kronecker import kronecker_precondition, kronecker_precondition_reference
from .lamb import lamb_step, lamb_step_reference
from .lars import lars_step, lars_step_reference
from .rank1_inverse import rank1_inverse_update, rank1_inverse_update_reference
from .sonew import (
    apply_sparse_inverse_reference,
    sonew_step,
    sonew_step_reference,
    sparse_inverse_factors_reference,
)
from .toeplitz import lag_sums, lag_sums_reference, toeplitz_matmul, toeplitz_matmul_reference
from .triangular import triangular_matmul, triangular_matmul_reference

__all__ = [
    "INTERPRETER",
    "KERNEL_DTYPES",
    "apply_sparse_inverse_reference",
    "backend_override",
    "block_covariance",
    "block_covariance_reference",
    "block_diagonal_matmul",
    "block_diagonal_matmul_reference",
    "diagonal_from_inner",
    "diagonal_from_inner_reference",
    "diagonal_matmul",
    "diagonal_matmul_reference",
    "eigen_precondition",
    "eigen_precondition_reference",
    "graft_step",
    "graft_step_reference",
    "hierarchical_matmul",
    "hierarchical_matmul_reference",
    "kronecker_precondition",
    "kronecker_precondition_reference",
    "lag_sums",
    "lag_sums_reference",
    "lamb_step",
    "lamb_step_reference",
    "lars_step",
    "lars_step_reference",
    "rank1_inverse_update",
    "rank1_inverse_update_reference",
    "sonew_step",
    "sonew_step_reference",
    "sparse_inverse_factors_reference",
    "symmetric_covariance",
    "symmetric_covariance_reference",
    "toeplitz_matmul",
    "toeplitz_matmul_reference",
    "triangular_matmul",
    "triangular_matmul_reference",
    "use_triton",
]
