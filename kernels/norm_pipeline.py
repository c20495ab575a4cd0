"""The launch pipeline LAMB and LARS share: the global gradient norm, a first pass that writes per-chunk
partial sums of two squared norms, their per-tensor reduction, and a second pass that uses the norms.

:func:`launch_two_passes` runs it for a bound call of an op (``op_declaration``); each op brings its
two chunked kernels (``launch_chunks``' argument order, then ``clip`` and their output: the partials
for the first, the norms for the second) and its config space. No host synchronisation.
"""

from __future__ import annotations

from typing import Callable

import torch

from kfopt.autotune import Config, ConfigSpace, shape_bucket

from .multi_tensor import dense_like, launch_chunks, launch_global_norm, launch_segment_norms
from .op_declaration import Call, ElementwiseOp


def launch_two_passes(op: ElementwiseOp, call: Call, configs: ConfigSpace, first, second, *,
                      max_grad_norm: float | None, reduce: Callable[[torch.Tensor], None] | None,
                      step_col: int | None) -> torch.Tensor:
    """Run ``first`` (partials of ``||a||^2, ||b||^2`` per chunk), the per-tensor norms (and
    ``step += ok`` for the table column ``step_col``), then ``second``; returns ``[||g_all||, coef, ok]``.
    Gradients laid out unlike their params are read through dense copies. ``reduce``: sharded
    tensors (``launch_global_norm``, ``launch_segment_norms``)."""
    addr = op.addr
    params, grads = call.tensors[op.tensors[0].name], call.tensors[op.tensors[1].name]
    columns = {**call.tensors, op.tensors[1].name: [dense_like(g, p) for g, p in zip(grads, params)]}

    def run(config: Config) -> torch.Tensor:
        table = op.table(columns, call.records, config["CHUNK"], call.device)
        clip = launch_global_norm(table, int(addr.value[1]), 1, max_grad_norm, call.skipped, config, call.device,
                                  call.grad_scale, call.found_inf, reduce)
        partial = torch.empty((max(table.n_chunks, 1), 2), dtype=torch.float32, device=call.device)
        launch_chunks(first, table, config, lambda lo, hi: (clip, partial[lo:hi]))
        norms = launch_segment_norms(table, partial, clip, step_col=step_col, reduce=reduce)
        launch_chunks(second, table, config, lambda lo, hi: (clip, norms))
        return clip

    return configs.launch(device=call.device, bucket=shape_bucket(sum(p.numel() for p in params)),
                          dtype=params[0].dtype, run=run, restore=op.restore(columns, call.skipped))
