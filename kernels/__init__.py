"""kfopt.kernels: Triton kernels with their PyTorch references (see ``dispatch`` for routing)."""

from .covariance import symmetric_covariance, symmetric_covariance_reference
from .dispatch import INTERPRETER, KERNEL_DTYPES, backend_override, use_triton
from .eigen_basis import eigen_precondition, eigen_precondition_reference
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

__all__ = [
    "apply_sparse_inverse_reference",
    "INTERPRETER",
    "KERNEL_DTYPES",
    "backend_override",
    "eigen_precondition",
    "eigen_precondition_reference",
    "kronecker_precondition",
    "kronecker_precondition_reference",
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
    "use_triton",
]
