"""``Preconditioner``: the protocol of kfopt's Kronecker-factored preconditioners (K-FAC's
``kfopt.kfac.KFACPreconditioner``, MKOR's ``kfopt.mkor.MKORPreconditioner``, SINGD's
``kfopt.singd.SINGDPreconditioner``).

A preconditioner takes the model, selects and captures its layers (``kfopt.capture``) and exchanges
everything between ranks through its ``distributor`` (``kfopt.distribution``). Its life per step:

1. accumulate statistics: the capture's hooks hand each captured call's rows to the preconditioner in
   the forward and backward passes of the steps that need them (it arms the capture for those);
2. ``step()``: update the second-order data when due (factors, inverses or decompositions, from the
   accumulated statistics averaged over the ranks), then precondition: replace the ``.grad`` of each
   preconditioned layer's weight and bias (``preconditioned_params()``) by the preconditioned gradient;
   the accumulated statistics are dropped;
3. the caller's optimizer steps on those gradients.

So it sits in front of any optimizer::

    loss.backward(); precond.step(); optimizer.step()

and ``kfopt.composed.ComposedOptimizer`` composes one with a base optimizer into a
``torch.optim.Optimizer``. ``discard_step()`` drops the statistics of a step that is not taken (a
GradScaler overflow). ``state_dict()`` holds plain tensors and numbers; ``check_state_dict`` raises
ValueError for a state that does not fit, changing nothing; ``load_state_dict`` checks, then loads.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .capture import LayerCapture
from .distribution import Distributor


class Preconditioner(Protocol):
    """A Kronecker-factored preconditioner (module docstring). ``steps`` counts completed steps."""

    capture: LayerCapture
    distributor: Distributor
    steps: int

    def step(self) -> torch.Tensor | None:
        """Update the second-order data when due and precondition the layers' gradients (in ``.grad``).
        Returns None, or a 0-d device bool: whether the step was taken (SINGD's: everything finite;
        where False, neither factors nor gradients changed), the verdict ``kfopt.composed`` passes on."""

    def discard_step(self) -> None:
        """Drop the statistics accumulated since the last step."""

    def preconditioned_params(self) -> list[torch.Tensor]:
        """The weights and biases whose gradients ``step()`` replaces."""

    def state_dict(self) -> dict: ...

    def check_state_dict(self, state_dict: dict) -> None: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


class PreconditionerAttributes:
    """An optimizer's shortcuts to its ``self.preconditioner``'s ``capture``, ``steps`` (completed steps)
    and ``layers`` (names of the preconditioned layers, as in ``model.named_modules()``, no DDP prefix)."""

    preconditioner: Preconditioner

    @property
    def capture(self) -> LayerCapture:
        return self.preconditioner.capture

    @property
    def steps(self) -> int:
        return self.preconditioner.steps

    @property
    def layers(self) -> list[str]:
        return self.preconditioner.layers
