"""``kfopt compare``: its arguments, their checks, and the sequence of runs and reports."""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import hashlib
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
from .plan import (GRID_RATIO, SELECTION_RULE, TIE_RULE, Run, describe_grid, factor_label, grid_exponents, key_id,
                   plan_runs, run_key, trim)
from .registry import BASELINE, REGISTRY, available_optimizers
from .runner import (DIVERGENCE_FACTOR, EVAL_POINTS, FINAL_LR_FRACTION, SMOOTHING, WARMUP_FRACTION,
                     eval_steps, train)
from .summary import summarize
from .tasks import SIZES, TASKS, Task, make_task

#: ``--thorough``: the full sweep with several seeds.
THOROUGH = {"sweep": 5, "seeds": 3}

DESCRIPTION = """\
Train the same model from the same seed with each optimizer and compare: validation loss at fixed
steps, steps and training time to reach a target loss, step time relative to AdamW, optimizer-state
memory, and divergence. With --sweep, each optimizer at its best learning rate of a grid; with
--seeds, means and min-max ranges over seeds and a verdict (better, worse, tie) against AdamW.
Writes a table (terminal and results.txt), results.json (also the cache of finished runs) and loss.png."""


def _optimizer_help() -> str:
    lines = ["optimizers (default: every available one not marked [variant]; --optimizers all: every available "
             "one; AdamW, the baseline, always runs):"]
    for name, spec in REGISTRY.items():
        reason = spec.unavailable_reason()
        lrs = ", ".join(f"{task} {lr:g}" for task, lr in spec.lr.items())
        hyper = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        marks = ("" if spec.in_default_run else " [variant]") + ("" if reason is None else f" [unavailable: {reason}]")
        lines.append(f"  {name:<8} {spec.summary}{marks}")
        lines.append(f"  {'':<8} lr: {lrs}; {hyper}")
    lines += ["", "examples:", "  kfopt compare", "  kfopt compare --optimizers lamb --lr lamb=5e-3 --steps 500",
              "  kfopt compare --thorough --out runs/thorough   (rerun the same line to continue after Ctrl-C)",
              "  kfopt compare --sweep 3 --seeds 2 --budget-s 1800",
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
                        help=f"comma-separated, e.g. lamb,lars, or all (default: every available one but the variants "
                        f"marked in the list below; {BASELINE} is always added)")
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
                        help="seed of the initial weights and the batches (default 0); the first seed with --seeds")
    parser.add_argument("--sweep", type=_int_at_least(1), metavar="K",
                        help=f"run every optimizer (AdamW too) at its default lr times a {GRID_RATIO:g}x-spaced grid of K "
                        f"points ({describe_grid(5)} for K=5) and report each at its best lr (default 1: no sweep)")
    parser.add_argument("--seeds", type=_int_at_least(1), metavar="N",
                        help="repeat the comparison for the seeds SEED..SEED+N-1 (initial weights and batches); "
                        "the table shows means and min-max ranges (default 1)")
    parser.add_argument("--thorough", action="store_true",
                        help=f"--sweep {THOROUGH['sweep']} --seeds {THOROUGH['seeds']} (either may still be given; "
                        "roughly 15x the default run time)")
    parser.add_argument("--budget-s", type=_positive_float, metavar="SECONDS",
                        help="cap the total time: after the first seed at the default lrs, shrink the grid and the "
                        "seeds to what fits (printed); without it the whole plan runs")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: ./kfopt_runs/<date-time>); runs "
                        "already in its results.json are reused, so the same --out continues or extends a comparison")
    parser.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    parser.add_argument("--distributed", choices=distributed.MODES,
                        help="train data-parallel on the ranks torchrun starts (torchrun --nproc-per-node N -m "
                        "kfopt compare --distributed ...): ddp (DistributedDataParallel) or fsdp (FSDP2 "
                        "fully_shard; the optimizers that step sharded parameters)")


def _select_optimizers(args, parser) -> list[str]:
    available = available_optimizers()
    if args.optimizers == ["all"]:
        requested = list(available)
    else:
        requested = args.optimizers or [name for name, spec in available.items() if spec.in_default_run]
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
                         f"{args.distributed} (sharded parameters: only AdamW, LAMB, LARS, SONew and K-FAC so far)")
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
    """What ``kfopt compare`` will run, resolved from the arguments (see ``plan`` for the grid, the
    seeds and their order)."""

    task: Task
    size: str
    names: list[str]
    lrs: dict[str, float]
    overrides: dict[str, dict]
    steps: int
    target: float
    grid: int
    seeds: list[int]
    budget_s: float | None
    initial_model: torch.nn.Module
    out: str
    distribution: distributed.Distribution | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (one process, or rank 0 of a distributed comparison)."""
        return self.distribution is None or self.distribution.is_main

    def agree(self, value):
        """Rank 0's ``value`` on every rank of a distributed comparison (``distributed.agree``)."""
        return distributed.agree(self.distribution, value)

    def __post_init__(self):
        self._models = {self.seeds[0]: self.initial_model}

    def model_for(self, seed: int) -> torch.nn.Module:
        """The initial model of ``seed`` (built with the global RNG seeded by ``seed``)."""
        if seed not in self._models:
            torch.manual_seed(seed)
            self._models[seed] = self.task.build_model()
        return self._models[seed]

    def context(self) -> dict:
        """What every run's cache key shares: task, size, steps, data, device, versions, the runner's constants."""
        text = getattr(self.task, "text", None)
        return {"task": self.task.name, "size": self.size, "steps": self.steps, "describe": self.task.describe,
                "data_sha256": None if text is None else hashlib.sha256(text).hexdigest(),
                "environment": _environment(self.task.device),
                "runner": {"warmup_fraction": WARMUP_FRACTION, "final_lr_fraction": FINAL_LR_FRACTION,
                           "smoothing": SMOOTHING, "eval_points": EVAL_POINTS,
                           "divergence_factor": DIVERGENCE_FACTOR}}


def _default_lr(name: str, task: str, given: dict[str, float]) -> float:
    """The lr of an optimizer without ``--lr``: that of the optimizer it takes its lr from (``lr_of``), as
    given or by default, else its own default."""
    spec = REGISTRY[name]
    return given.get(spec.lr_of, spec.lr[task]) if spec.lr_of is not None else spec.lr[task]


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
            for name in names:
                overrides[name] = {**distributed.required_overrides(args.distributed, name, distribution.world),
                                   **overrides[name]}
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    torch.manual_seed(args.seed)
    initial_model = task.build_model()
    lrs = {name: lrs.get(name, _default_lr(name, args.task, lrs)) for name in names}
    for name in names:
        try:
            REGISTRY[name].build(task.prepare(copy.deepcopy(initial_model)), lrs[name], **overrides[name])
        except (TypeError, ValueError) as exc:
            parser.error(f"optimizer {name!r} rejects its hyperparameters: {exc}")
    out = args.out or os.path.join("kfopt_runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out = distributed.agree(distribution, out)  # rank 0's folder (the clocks may differ by a second)
    try:
        if distribution is None or distribution.is_main:
            os.makedirs(out, exist_ok=True)
    except OSError as exc:
        parser.error(f"argument --out: cannot create {out!r}: {exc}")
    grid, seeds = args.sweep or (THOROUGH["sweep"] if args.thorough else 1), args.seeds or (
        THOROUGH["seeds"] if args.thorough else 1)
    return Plan(task, size, names, lrs, overrides, args.steps or task.steps, args.target or task.target, grid,
                list(range(args.seed, args.seed + seeds)), args.budget_s, initial_model, out, distribution)


class _Session:
    """The runs of one invocation: what the cache already holds, what was run, the progress bar."""

    def __init__(self, plan: Plan, args: argparse.Namespace, header: dict):
        self.plan, self.args, self.header = plan, args, header
        self.json_path = os.path.join(plan.out, "results.json")
        self.cache = plan.agree(report.load_cache(self.json_path) if plan.is_main else None)
        self.context = plan.context()
        self.records: dict[str, dict] = {}  # key_id -> record, of this invocation's plan
        self.ran = 0
        self.budget_note = None

    def key(self, run: Run) -> dict:
        spec = REGISTRY[run.optimizer]
        return run_key(self.context, run, f"{spec.module}.{spec.cls}", spec.hyperparameters(self.plan.overrides[run.optimizer]))

    def pending(self, runs: list[Run]) -> list[Run]:
        """The runs of ``runs`` neither cached nor run yet."""
        ids = [key_id(self.key(run)) for run in runs]
        return [run for run, i in zip(runs, ids) if i not in self.cache and i not in self.records]

    def execute(self, runs: list[Run], bar: tqdm) -> bool:
        """Run (or take from the cache) every run of ``runs``; saves results.json after each run.
        Returns False after Ctrl-C."""
        for run in runs:
            key = self.key(run)
            ident = key_id(key)
            if ident in self.records:
                continue
            if ident in self.cache:
                self.records[ident] = {**self.cache[ident], "exponent": run.exponent}
                continue
            bar.set_description_str(f"{run.optimizer} lr {run.lr:.3g} ({factor_label(run.exponent)}) "
                                    f"seed {run.seed}", refresh=False)

            def progress(step, loss):
                bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
                bar.update()

            try:
                result = train(self.plan.task, REGISTRY[run.optimizer], run.lr, self.plan.overrides[run.optimizer],
                               self.plan.model_for(run.seed), steps=self.plan.steps, seed=run.seed, progress=progress)
            except KeyboardInterrupt:
                return False
            bar.update(self.plan.steps - result.steps_done)  # a run that stopped early
            self.ran += 1
            self.records[ident] = report.run_record(result, run, key)
            self.save_json(interrupted=result.status == "interrupted")
            if result.status == "interrupted":
                return False
        return True

    def estimate_s(self, runs: list[Run]) -> float:
        """Predicted seconds of ``runs`` not done yet: each at the wall time of its optimizer's core run."""
        core = {r["optimizer"]: r["wall_s"] for r in self.records.values()
                if r["exponent"] == 0 and r["seed"] == self.plan.seeds[0]}
        return sum(core.get(run.optimizer, max(core.values(), default=0.0)) for run in self.pending(runs))

    def plan_records(self, runs: list[Run]) -> list[dict]:
        ids = [key_id(self.key(run)) for run in runs]
        return [self.records[i] for i in ids if i in self.records]

    def save_json(self, interrupted: bool, runs: list[Run] | None = None, summaries: dict | None = None,
                  files: dict | None = None) -> None:
        """Write results.json: this plan's runs, the summaries, and the cached runs outside the plan
        (``other_runs``, kept for a later invocation). Rank 0 alone writes in a distributed comparison."""
        if not self.plan.is_main:
            return
        plan = self.plan
        records = list(self.records.values())
        ids = {r["key_id"] for r in records}
        grid = grid_exponents(plan.grid)
        report.write_json(self.json_path, {
            **self.header, "interrupted": interrupted,
            "not_run": [] if runs is None else [f"{r.optimizer} lr {r.lr:.3g} seed {r.seed}" for r in self.pending(runs)],
            "runs_reused": len(records) - self.ran, "runs_run": self.ran,
            "environment": _environment(plan.task.device),
            "config": {"task": self.args.task, "size": plan.size, "steps": plan.steps, "seeds": plan.seeds,
                       "target": plan.target, "parameters": sum(p.numel() for p in plan.initial_model.parameters()),
                       "eval_steps": eval_steps(plan.steps), "table_columns": report.table_columns(plan.steps),
                       "default_lrs": plan.lrs,
                       "sweep": {"points": plan.grid, "ratio": GRID_RATIO, "exponents": grid,
                                 "factors": [GRID_RATIO ** e for e in grid], "grid": describe_grid(plan.grid),
                                 "selection_rule": SELECTION_RULE},
                       "tie_rule": TIE_RULE, "budget_s": plan.budget_s, "budget_note": self.budget_note,
                       "lr_schedule": {"warmup_fraction": WARMUP_FRACTION, "final_lr_fraction": FINAL_LR_FRACTION,
                                       "shape": "linear warm-up, cosine decay"},
                       "smoothing": SMOOTHING, "eval_points": EVAL_POINTS, "divergence_factor": DIVERGENCE_FACTOR,
                       "baseline": BASELINE, **plan.task.describe},
            "summary": summaries, "runs": records,
            "other_runs": [r for i, r in self.cache.items() if i not in ids], "files": files,
        })


def _trim(session: _Session, started: float) -> None:
    """Shrink the plan's grid and seeds to fit ``--budget-s`` (the rule: ``plan.trim``); prints the note."""
    plan = session.plan
    if plan.budget_s is None or (plan.grid, len(plan.seeds)) == (1, 1):
        return
    remaining = plan.budget_s - (time.perf_counter() - started)

    def cost(k, n):
        return session.estimate_s(plan_runs(plan.names, plan.lrs, k, plan.seeds[:n]))

    k, n = plan.agree(trim(plan.grid, len(plan.seeds), cost, remaining))  # rank 0's timings decide
    if (k, n) == (plan.grid, len(plan.seeds)):
        return
    session.budget_note = (
        f"--budget-s {plan.budget_s:g}: the full plan (grid {describe_grid(plan.grid)}, {len(plan.seeds)} seed(s)) "
        f"would take about {cost(plan.grid, len(plan.seeds)):.0f} s more, {max(remaining, 0):.0f} s are left; "
        f"running grid {describe_grid(k)} with {n} seed(s) (about {cost(k, n):.0f} s) instead")
    plan.grid, plan.seeds = k, plan.seeds[:n]
    if plan.is_main:
        tqdm.write(f"note: {session.budget_note}")


def run_compare(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> int:
    """Check ``args`` (parsed from ``command``), run the plan (reusing the runs cached in the output
    folder's results.json), write the reports; returns the exit status (0; 1 if a run failed with an
    error; 130 after Ctrl-C)."""
    plan = _plan(args, parser)
    started, clock = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    session = _Session(plan, args, {"command": command, "started": started})
    full = plan_runs(plan.names, plan.lrs, plan.grid, plan.seeds)
    pending = session.pending(full)
    parameters = sum(p.numel() for p in plan.initial_model.parameters())
    where = plan.task.device if plan.distribution is None else (
        f"{plan.distribution.world} ranks ({plan.distribution.mode}, {plan.task.device.type})")
    if plan.is_main:
        print(f"kfopt compare: task {args.task} ({plan.size}, {plan.task.describe['model']['type']}, "
              f"{parameters / 1e6:.2f}M parameters) on {where}, {plan.steps} steps, target {plan.target:g}; "
              f"optimizers: {', '.join(plan.names)}\n"
              f"lr grid: {describe_grid(plan.grid)} of each default lr; seeds: {', '.join(map(str, plan.seeds))}; "
              f"{len(full)} runs, {len(full) - len(pending)} of them cached in {session.json_path}"
              + ("" if plan.budget_s is None else f"; budget {plan.budget_s:g} s"), flush=True)
    core = [run for run in full if run.exponent == 0 and run.seed == plan.seeds[0]]
    with tqdm(total=plan.steps * len(pending), unit="step", dynamic_ncols=True, disable=not plan.is_main) as bar:
        finished = session.execute(core, bar)
        if finished:
            _trim(session, clock)
            runs = plan_runs(plan.names, plan.lrs, plan.grid, plan.seeds)
            bar.total = plan.steps * (len(session.pending(runs)) + session.ran)
            bar.refresh()
            finished = session.execute(runs, bar)
    runs = plan_runs(plan.names, plan.lrs, plan.grid, plan.seeds)
    wall = time.perf_counter() - clock
    session.header["wall_time_s"] = wall
    records = session.plan_records(runs)
    status = 130 if not finished else 1 if any(r["status"] == "failed" for r in records) else 0
    if plan.is_main:
        _report(plan, args, session, runs, records, finished, wall)
    if plan.distribution is not None:
        distributed.finish(status)
    return status


def _report(plan: Plan, args: argparse.Namespace, session: _Session, runs: list[Run], records: list[dict],
            finished: bool, wall: float) -> None:
    """Write results.txt, loss.png (unless --no-plot) and results.json; print the table."""
    summaries = summarize(records, plan.names, grid_exponents(plan.grid), plan.target, BASELINE,
                          {name: REGISTRY[name].lr_of for name in plan.names if REGISTRY[name].lr_of is not None})
    table = report.format_table(summaries, report.table_columns(plan.steps), plan.target, BASELINE,
                                grid_exponents(plan.grid), plan.seeds)
    if session.budget_note:
        table += f"\nnote: {session.budget_note}"
    not_run = session.pending(runs)
    if not finished:
        table += (f"\ninterrupted (Ctrl-C): results of the runs measured so far; not run: "
                  f"{', '.join(f'{r.optimizer} (lr {r.lr:.3g}, seed {r.seed})' for r in not_run) or 'none'}")
    paths = {"table": os.path.join(plan.out, "results.txt"), "json": session.json_path}
    with open(paths["table"], "w") as f:
        f.write(table + "\n")
    if not args.no_plot:
        paths["plot"] = os.path.join(plan.out, "loss.png")
        try:
            report.write_plot(paths["plot"], summaries, records, plan.target,
                              f"kfopt compare: {args.task} ({plan.size}) on {plan.task.device}, "
                              f"seeds {', '.join(map(str, plan.seeds))}", grid_exponents(plan.grid))
        except ImportError:
            print("matplotlib is not installed: no plot (python -m pip install 'kfopt[plot]')", file=sys.stderr)
            del paths["plot"]
    session.save_json(not finished, runs, summaries, paths)
    print("\n" + table)
    print(f"\nwall time: {wall:.1f} s ({session.ran} runs run, {len(records) - session.ran} reused from the cache)")
    for kind, path in paths.items():
        print(f"{kind:>5}: {path}")
