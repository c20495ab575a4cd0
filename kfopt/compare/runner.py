"""One training run of ``kfopt compare``: the loop, its measurements, divergence and Ctrl-C.

Every run of a seed starts from the same initial weights (a copy of the seed's model) and draws the
same batches (a generator seeded with ``seed``). Per step it records the training loss of the batch (before the
update) and the step time: forward, backward, ``optimizer.step()`` and the LR schedule, with CUDA
synchronised before and after; sampling the batch and evaluation are not timed.

* Learning-rate schedule (the same for all optimizers): linear warm-up over the first
  ``WARMUP_FRACTION`` of the steps, then cosine decay to ``FINAL_LR_FRACTION`` of the peak.
* Smoothed training loss: a bias-corrected exponential moving average of the per-step loss with
  ``SMOOTHING`` (what the target and the plots use; per-batch loss is noisy).
* Target: the first step whose smoothed training loss is <= the target (``steps_to_target``; derived
  from the recorded losses, so a cached run serves any target).
* Validation: at step 0 and at ``EVAL_POINTS`` evenly spaced steps up to the last one.
* Divergence: a non-finite loss, or a loss above ``DIVERGENCE_FACTOR`` x the first step's loss,
  stops the run and marks it ``diverged``; the other runs go on.
* An exception raised by the optimizer or the model marks the run ``failed`` with the message.
* Ctrl-C marks the run ``interrupted`` and returns what was measured so far.
* Optimizer-state memory: bytes of every tensor the optimizer holds (see ``state_bytes``; each
  storage counted once, the model's own tensors excluded), measured at the end of the run.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from kfopt.sharding import local

from .registry import OptimizerSpec
from .tasks import Task

WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1
SMOOTHING = 0.9
EVAL_POINTS = 8
DIVERGENCE_FACTOR = 3.0


@dataclass
class RunResult:
    """Everything measured in one run (``status``: ok, diverged, failed, interrupted)."""

    optimizer: str
    lr: float
    hyperparameters: dict
    seed: int = 0
    status: str = "ok"
    message: str = ""
    train_loss: list[float] = field(default_factory=list)
    smoothed_loss: list[float] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    state_bytes: int = 0
    skipped_steps: int | None = None
    wall_s: float = 0.0

    @property
    def steps_done(self) -> int:
        return len(self.train_loss)

    @property
    def median_step_time(self) -> float | None:
        """Median step time in seconds, leaving out the first step (lazy state, kernel compilation)."""
        times = self.step_time[1:] or self.step_time
        return statistics.median(times) if times else None


def steps_to_target(smoothed_loss: list[float], target: float) -> int | None:
    """The first (1-based) step whose smoothed training loss is <= ``target``; None if none is."""
    return next((step for step, loss in enumerate(smoothed_loss, 1) if loss <= target), None)


def lr_factor(step: int, steps: int) -> float:
    """The multiplier of the peak learning rate for 0-based ``step`` of ``steps`` (warm-up + cosine)."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def eval_steps(steps: int) -> list[int]:
    """Steps after which the model is validated: 0 and ``EVAL_POINTS`` evenly spaced ones, ending at ``steps``."""
    return sorted({round(steps * k / EVAL_POINTS) for k in range(EVAL_POINTS + 1)})


def train_step(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """One optimisation step on ``batch``; returns the batch's loss before the update."""
    loss = task.loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    value = loss.item()
    if hasattr(optimizer, "observe"):  # MKOR-H decides its switch on the observed losses
        optimizer.observe(value)
    return value


def state_bytes(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Bytes of every tensor the optimizer holds (its state, and for Kronecker-factored optimizers
    their factors, eigen data and base optimizer), each storage once; the model's own parameters,
    gradients and buffers are not counted, and modules are not entered. Sharded (DTensor) tensors
    count their local shard."""
    owned_by_model = {local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    owned_by_model |= {local(p.grad).untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    seen, total, stack, visited = set(owned_by_model), 0, [optimizer.__dict__], set()
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = local(item).untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, nn.Module) or id(item) in visited:
            continue
        elif isinstance(item, dict):
            visited.add(id(item))
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            visited.add(id(item))
            stack.extend(item)
        elif hasattr(item, "__dict__") and type(item).__module__.startswith(("kfopt", "torch.optim")):
            visited.add(id(item))
            stack.extend(vars(item).values())
    return total


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(task: Task, spec: OptimizerSpec, lr: float, overrides: dict, initial_model: nn.Module, *,
          steps: int, seed: int, progress: Callable[[int, float], None] = lambda step, loss: None
          ) -> RunResult:
    """Train a copy of ``initial_model`` with ``spec`` for ``steps`` steps; ``progress(step, loss)``
    is called after every step; the batches come from a generator seeded with ``seed``. Never raises
    for a failing optimizer or Ctrl-C: see ``status``."""
    started = time.perf_counter()
    result = RunResult(spec.name, lr, spec.hyperparameters(overrides), seed)
    model = task.prepare(copy.deepcopy(initial_model))
    generator = torch.Generator().manual_seed(seed)
    checkpoints = set(eval_steps(steps))
    optimizer = None
    try:
        optimizer = spec.build(model, lr, **overrides)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps))
        result.evals.append({"step": 0, "time": 0.0, **task.evaluate(model)})
        elapsed, average = 0.0, 0.0
        for step in range(1, steps + 1):
            batch = task.train_batch(generator)
            _synchronize(task.device)
            start = time.perf_counter()
            loss = train_step(task, model, optimizer, batch)
            schedule.step()
            _synchronize(task.device)
            result.step_time.append(time.perf_counter() - start)
            elapsed += result.step_time[-1]
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            result.train_loss.append(loss)
            result.smoothed_loss.append(average / (1 - SMOOTHING ** step))
            progress(step, loss)
            if not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * result.train_loss[0]:
                result.status = "diverged"
                result.message = f"loss {loss:.4g} at step {step} (first step: {result.train_loss[0]:.4g})"
                break
            if step in checkpoints:
                result.evals.append({"step": step, "time": elapsed, **task.evaluate(model)})
                if not math.isfinite(result.evals[-1]["loss"]):
                    result.status = "diverged"
                    result.message = f"validation loss {result.evals[-1]['loss']} at step {step}"
                    break
    except KeyboardInterrupt:
        result.status, result.message = "interrupted", f"Ctrl-C after {result.steps_done} steps"
    except Exception as exc:  # noqa: BLE001 - a failing optimizer must not stop the comparison
        result.status = "failed"
        result.message = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if optimizer is not None:
        result.state_bytes = state_bytes(optimizer, model)
        skipped = getattr(optimizer, "skipped_steps", None)
        result.skipped_steps = None if skipped is None else int(skipped)
    result.wall_s = time.perf_counter() - started
    return result
