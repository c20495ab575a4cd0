"""The runs of one comparison: learning-rate grid, seeds, their order, cache keys, budget trimming.

* Grid (``--sweep K``): every optimizer, AdamW included, runs at its default learning rate (or the
  one given with ``--lr``; an optimizer that takes another's lr, ``lr_of``, that one's) times ``GRID_RATIO ** e`` for the ``K`` integer exponents
  ``e = -(K // 2) .. K - 1 - K // 2`` (K=5: x1/4, x1/2, x1, x2, x4; K=1: the default alone). A smaller
  grid is a centred subset of a larger one.
* Seeds (``--seeds N``): ``seed, seed + 1, ..., seed + N - 1``; a seed fixes the initial weights and
  the batch order, and every optimizer and learning rate of a seed gets the same of both.
* Order: seed by seed; within a seed the grid from the centre outwards (x1, x1/2, x2, x1/4, ...), every
  optimizer at each point. The first seed at x1 is the *core*: the comparison without sweep.
* Cache key: everything that determines a run's measurements (``run_key``); a finished run whose key
  is in the output folder's ``results.json`` is reused instead of run again.
* Budget (``--budget-s``): after the core, the rest of the plan shrinks to the largest sub-plan
  (grid ``k <= K``, seeds ``n <= N``: most runs ``k * n``, on a tie the wider grid) whose predicted
  time fits in what is left; a run's time is predicted by the wall time of that optimizer's core run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

#: Ratio between neighbouring learning rates of the sweep grid.
GRID_RATIO = 2.0

SELECTION_RULE = ("best lr per optimizer: fewest diverged or failed seeds, then the lowest mean final "
                  "validation loss over the seeds")
TIE_RULE = ("vs the baseline: 'tie' when the min-max ranges over seeds of the final validation loss overlap, "
            "otherwise 'better' or 'worse' (no verdict from one seed)")


def grid_exponents(k: int) -> list[int]:
    """The exponents of ``GRID_RATIO`` of a ``k``-point grid, ascending."""
    return list(range(-(k // 2), k - k // 2))


def _centre_out(exponents: list[int]) -> list[int]:
    return sorted(exponents, key=lambda e: (abs(e), e))


@dataclass(frozen=True)
class Run:
    """One planned training run."""

    optimizer: str
    exponent: int
    seed: int
    lr: float

    @property
    def factor(self) -> float:
        return GRID_RATIO ** self.exponent


def plan_runs(names: list[str], lrs: dict[str, float], k: int, seeds: list[int]) -> list[Run]:
    """The runs of a ``k``-point grid over ``seeds`` in plan order (see the module docstring)."""
    return [Run(name, e, seed, lrs[name] * GRID_RATIO ** e)
            for seed in seeds for e in _centre_out(grid_exponents(k)) for name in names]


def run_key(context: dict, run: Run, optimizer_class: str, hyperparameters: dict) -> dict:
    """The cache key of ``run``: ``context`` (task, size, steps, data fingerprint, device, versions,
    backend, schedule constants) plus the optimizer (name and class), its lr and hyperparameters, and
    the seed."""
    return {**context, "optimizer": run.optimizer, "class": optimizer_class, "lr": run.lr,
            "hyperparameters": repr(sorted(hyperparameters.items())), "seed": run.seed}


def key_id(key: dict) -> str:
    """A short digest of ``key`` (the lookup handle in ``results.json``)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()[:20]


def trim(k: int, n: int, cost: Callable[[int, int], float], remaining_s: float) -> tuple[int, int]:
    """The largest sub-plan (``k' <= k`` grid points, ``n' <= n`` seeds) whose ``cost(k', n')`` in
    seconds fits in ``remaining_s``: most runs ``k' * n'``, on a tie the wider grid; (1, 1), the
    core, when nothing larger fits."""
    fitting = [(kk * nn, kk, nn) for kk in range(1, k + 1) for nn in range(1, n + 1)
               if (kk, nn) == (1, 1) or cost(kk, nn) <= remaining_s]
    _, kk, nn = max(fitting)
    return kk, nn


def factor_label(exponent: int) -> str:
    """``"x1/4"`` for exponent -2, ``"x2"`` for 1."""
    text = f"{GRID_RATIO ** abs(exponent):g}"
    return f"x1/{text}" if exponent < 0 else f"x{text}"


def describe_grid(k: int) -> str:
    """``"x1/4, x1/2, x1, x2, x4"`` for k=5."""
    return ", ".join(factor_label(e) for e in grid_exponents(k))
