"""kfopt.kernels: Triton kernels with their PyTorch references (see ``dispatch`` for routing)."""

from .dispatch import INTERPRETER, KERNEL_DTYPES, backend_override, use_triton
from .lamb import lamb_step, lamb_step_reference
from .lars import lars_step, lars_step_reference

__all__ = [
    "INTERPRETER",
    "KERNEL_DTYPES",
    "backend_override",
    "lamb_step",
    "lamb_step_reference",
    "lars_step",
    "lars_step_reference",
    "use_triton",
]
