"""``kfopt compare``: its arguments, their checks, and the sequence of runs and reports."""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import kfopt

from . import distributed, report
from .registry import BASELINE, REGISTRY, available_optimizers
from .runner import (DIVERGENCE_FACTOR, EVAL_POINTS, FINAL_LR_FRACTION, SMOOTHING, WARMUP_FRACTION, RunResult,
                     eval_steps, train)
from .tasks import SIZES, TASKS, Task, make_task

DESCRIPTION = """\
Train the same model from the same seed with each optimizer and compare: validation loss at fixed
steps, steps and training time to reach a target loss, step time relative to AdamW, optimizer-state
memory, and divergence. Writes a table (terminal and results.txt), results.json and loss.png."""


def _optimizer_help() -> str:
    lines = ["optimizers (default: every available one; AdamW, the baseline, always runs):"]
    for name, spec in REGISTRY.items():
        reason = spec.unavailable_reason()
        lrs = ", ".join(f"{task} {lr:g}" for task, lr in spec.lr.items())
        hyper = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        lines.append(f"  {name:<8} {spec.summary}{'' if reason is None else ' [unavailable: ' + reason + ']'}")
        lines.append(f"  {'':<8} lr: {lrs}; {hyper}")
    lines += ["", "examples:", "  kfopt compare", "  kfopt compare --optimizers lamb --lr lamb=5e-3 --steps 500",
              "  kfopt compare --task digits", "  kfopt compare --text book.txt --size medium --device cuda"]
    return "\n".join(lines)


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of optimizer names")
    return names


def _lr_assignments(text: str) -> list[tuple[str, float]]:
    """``"lamb=3e-3,adamw=1e-3"`` -> ``[("lamb", 0.003), ("adamw", 0.001)]``."""
    pairs = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. lamb=3e-3), got {item!r}")
        try:
            pairs.append((name.strip().lower(), _positive_float(value.strip())))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{item!r}: {exc}") from None
    return pairs


def _hparam_assignment(text: str) -> tuple[str, str, object]:
    """``"lamb.weight_decay=0.1"`` -> ``("lamb", "weight_decay", 0.1)`` (the value is a Python literal)."""
    target, sep, value = text.partition("=")
    name, dot, key = target.partition(".")
    if not sep or not dot or not name.strip() or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME.KEY=VALUE (e.g. lamb.weight_decay=0.1), got {text!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the value must be a Python literal (number, True, (0.9, 0.99), ...)") from None
    return name.strip().lower(), key.strip(), parsed


def _device(text: str) -> str:
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda[:N], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda[:N], got {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kfopt compare``."""
    parser.description = DESCRIPTION
    parser.epilog = _optimizer_help()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--task", choices=TASKS, default="chars",
                        help="chars: byte-level transformer on text (default); "
                        "digits: CNN on scikit-learn's 8x8 digits")
    parser.add_argument("--text", metavar="FILE", help="train the chars task on this text file instead of the "
                        "embedded slice of the Python standard library's source")
    parser.add_argument("--optimizers", type=_names, metavar="LIST",
                        help=f"comma-separated, e.g. lamb,lars (default: all available; {BASELINE} is always added)")
    parser.add_argument("--steps", type=_int_at_least(1),
                        help="training steps per optimizer (default: per task and size)")
    parser.add_argument("--size", choices=SIZES, help="model and budget size (default: small on CPU, medium on CUDA)")
    parser.add_argument("--device", type=_device, default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    parser.add_argument("--lr", type=_lr_assignments, action="append", default=[], metavar="NAME=VALUE[,...]",
                        help="peak learning rate of an optimizer (repeatable), e.g. --lr lamb=5e-3,adamw=1e-3")
    parser.add_argument("--hparam", type=_hparam_assignment, action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="any other hyperparameter (repeatable), e.g. --hparam lamb.weight_decay=0.1")
    parser.add_argument("--target", type=_positive_float,
                        help="target smoothed training loss (default: per task and size)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed of the initial weights and the batches (default 0)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: ./kfopt_runs/<date-time>)")
    parser.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    parser.add_argument("--distributed", choices=distributed.MODES,
                        help="train data-parallel on the ranks torchrun starts (torchrun --nproc-per-node N -m "
                        "kfopt compare --distributed ...): ddp (DistributedDataParallel) or fsdp (FSDP2 "
                        "fully_shard; the optimizers that step sharded parameters)")


def _select_optimizers(args, parser) -> list[str]:
    available = available_optimizers()
    requested = args.optimizers or list(available)
    for name in requested:
        if name not in REGISTRY:
            parser.error(f"argument --optimizers: unknown optimizer {name!r}; available: {', '.join(available)}")
        if name not in available:
            parser.error(f"argument --optimizers: {name!r} is not available in this installation "
                         f"({REGISTRY[name].unavailable_reason()}); available: {', '.join(available)}")
    if args.distributed:
        unsupported = [name for name in requested if not distributed.supports(args.distributed, name)]
        if unsupported and args.optimizers:
            parser.error(f"argument --optimizers: {', '.join(unsupported)} cannot train under --distributed "
                         f"{args.distributed} (sharded parameters: only AdamW, LAMB and LARS so far)")
        if unsupported and os.environ.get("RANK", "0") == "0":
            print(f"--distributed {args.distributed}: leaving out {', '.join(unsupported)} (they do not step "
                  "sharded parameters yet)", file=sys.stderr)
        requested = [name for name in requested if name not in unsupported]
    return list(dict.fromkeys([BASELINE] + requested))


def _resolve_device(text: str, parser) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {text!r} requested but CUDA is not available "
                         f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_names(option: str, names, selected: list[str], parser) -> None:
    for name in names:
        if name not in selected:
            parser.error(f"argument {option}: {name!r} is not among the optimizers compared ({', '.join(selected)})")


def _environment(device: torch.device) -> dict:
    return {"kfopt": kfopt.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch_threads": torch.get_num_threads(), "kfopt_backend": os.environ.get("KFOPT_BACKEND", "")}


@dataclass
class Plan:
    """What ``kfopt compare`` will run, resolved from the arguments."""

    task: Task
    size: str
    names: list[str]
    lrs: dict[str, float]
    overrides: dict[str, dict]
    steps: int
    target: float
    initial_model: torch.nn.Module
    out: str
    distribution: distributed.Distribution | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (one process, or rank 0 of a distributed comparison)."""
        return self.distribution is None or self.distribution.is_main


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    """Check the arguments (usage error on any problem) and resolve the defaults; loads the data and
    builds the initial model and, once, every optimizer (so bad hyperparameters fail before training)."""
    if args.text is not None:
        if args.task != "chars":
            parser.error("argument --text: only the chars task trains on text (drop --task digits)")
        if not os.path.isfile(args.text):
            parser.error(f"argument --text: no such file: {args.text!r}")
    names = _select_optimizers(args, parser)
    lrs = dict(pair for group in args.lr for pair in group)
    _check_names("--lr", lrs, names, parser)
    overrides = {name: dict(REGISTRY[name].task_defaults.get(args.task, {})) for name in names}
    for name, key, value in args.hparam:
        _check_names("--hparam", [name], names, parser)
        overrides[name][key] = value
    device = _resolve_device(args.device, parser)
    size = args.size or ("medium" if device.type == "cuda" else "small")
    distribution = None
    try:
        if args.distributed:
            distribution = distributed.start(args.distributed, device)
            device = distribution.device
        task = make_task(args.task, size, device, args.text)
        if distribution is not None:
            task = distributed.DistributedTask(task, distribution)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    torch.manual_seed(args.seed)
    initial_model = task.build_model()
    lrs = {name: lrs.get(name, REGISTRY[name].lr[args.task]) for name in names}
    for name in names:
        try:
            REGISTRY[name].build(task.prepare(copy.deepcopy(initial_model)), lrs[name], **overrides[name])
        except (TypeError, ValueError) as exc:
            parser.error(f"optimizer {name!r} rejects its hyperparameters: {exc}")
    out = args.out or os.path.join("kfopt_runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if distribution is not None and distribution.world > 1:  # rank 0's folder (the clocks may differ by a second)
        shared = [out]
        torch.distributed.broadcast_object_list(shared, src=0)
        out = shared[0]
    try:
        if distribution is None or distribution.is_main:
            os.makedirs(out, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot create {out!r}: {exc}")
    return Plan(task, size, names, lrs, overrides, args.steps or task.steps, args.target or task.target,
                initial_model, out, distribution)


def _run_all(plan: Plan, seed: int) -> tuple[list[RunResult], bool]:
    """Train with every optimizer in turn, a progress bar each; stops at Ctrl-C.
    Returns the results so far and whether it was interrupted."""
    results = []
    try:
        for name in plan.names:
            with tqdm(total=plan.steps, desc=f"{name:>8}", unit="step", dynamic_ncols=True,
                      disable=not plan.is_main) as bar:
                def progress(step, loss, bar=bar):
                    bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
                    bar.update()

                results.append(train(plan.task, REGISTRY[name], plan.lrs[name], plan.overrides[name],
                                     plan.initial_model, steps=plan.steps, seed=seed, target=plan.target,
                                     progress=progress))
            if results[-1].status == "interrupted":
                return results, True
    except KeyboardInterrupt:
        return results, True
    return results, False


def _write_reports(plan: Plan, args: argparse.Namespace, results: list[RunResult], interrupted: bool,
                   header: dict) -> tuple[str, dict[str, str]]:
    """Write results.txt, loss.png (unless --no-plot) and results.json; returns the table and the paths."""
    baseline = next((r for r in results if r.optimizer == BASELINE), None)
    records = [report.run_record(r, baseline) for r in results]
    not_run = plan.names[len(results):]
    paths = {"table": os.path.join(plan.out, "results.txt"), "json": os.path.join(plan.out, "results.json")}
    columns = eval_steps(plan.steps)[2::2]
    table = report.format_table(records, columns, plan.target, BASELINE)
    if interrupted:
        table += f"\ninterrupted (Ctrl-C): results of the runs measured so far; not run: {', '.join(not_run) or 'none'}"
    with open(paths["table"], "w") as f:
        f.write(table + "\n")
    if not args.no_plot:
        paths["plot"] = os.path.join(plan.out, "loss.png")
        try:
            report.write_plot(paths["plot"], records, plan.target,
                              f"kfopt compare: {args.task} ({plan.size}) on {plan.task.device}, seed {args.seed}")
        except ImportError:
            print("matplotlib is not installed: no plot (python -m pip install 'kfopt[plot]')", file=sys.stderr)
            del paths["plot"]
    parameters = sum(p.numel() for p in plan.initial_model.parameters())
    report.write_json(paths["json"], {
        **header, "interrupted": interrupted, "not_run": not_run, "environment": _environment(plan.task.device),
        "config": {"task": args.task, "size": plan.size, "steps": plan.steps, "seed": args.seed,
                   "target": plan.target, "parameters": parameters, "eval_steps": eval_steps(plan.steps),
                   "table_columns": columns,
                   "lr_schedule": {"warmup_fraction": WARMUP_FRACTION, "final_lr_fraction": FINAL_LR_FRACTION,
                                   "shape": "linear warm-up, cosine decay"},
                   "smoothing": SMOOTHING, "eval_points": EVAL_POINTS, "divergence_factor": DIVERGENCE_FACTOR,
                   "baseline": BASELINE, **plan.task.describe},
        "runs": records, "files": paths,
    })
    return table, paths


def run_compare(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> int:
    """Check ``args`` (parsed from ``command``), run every optimizer, write the reports; returns the
    exit status (0; 1 if a run failed with an error; 130 after Ctrl-C)."""
    plan = _plan(args, parser)
    parameters = sum(p.numel() for p in plan.initial_model.parameters())
    where = plan.task.device if plan.distribution is None else (
        f"{plan.distribution.world} ranks ({plan.distribution.mode}, {plan.task.device.type})")
    if plan.is_main:
        print(f"kfopt compare: task {args.task} ({plan.size}, {plan.task.describe['model']['type']}, "
              f"{parameters / 1e6:.2f}M parameters) on {where}, {plan.steps} steps, seed {args.seed}, "
              f"target {plan.target:g}; optimizers: {', '.join(plan.names)}", flush=True)
    started, clock = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    results, interrupted = _run_all(plan, args.seed)
    wall = time.perf_counter() - clock
    if plan.is_main:
        table, paths = _write_reports(plan, args, results, interrupted,
                                      {"command": command, "started": started, "wall_time_s": wall})
        print("\n" + table)
        print(f"\nwall time of the runs: {wall:.1f} s")
        for kind, path in paths.items():
            print(f"{kind:>5}: {path}")
    status = 130 if interrupted else 1 if any(r.status == "failed" for r in results) else 0
    if plan.distribution is not None:
        distributed.finish(status)
    return status
