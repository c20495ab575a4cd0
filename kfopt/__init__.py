"""kfopt: fused Triton kernels for second-order and large-batch optimizers."""

__version__ = "0.1.0"
