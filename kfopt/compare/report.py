"""The outputs of ``kfopt compare``: a record per run, the terminal tables, the JSON file, the PNG plot.

The tables and the plot are drawn from the same records and summaries (``summary``) that go into
the JSON, so they agree.
Non-finite numbers (a diverged loss) are written to JSON as ``null``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

from .plan import GRID_RATIO, SELECTION_RULE, TIE_RULE, Run, describe_grid, factor_label, key_id
from .runner import RunResult, eval_steps

MIB = 2 ** 20


def run_record(result: RunResult, run: Run, key: dict) -> dict:
    """``result`` of the planned ``run`` as a dict with its cache ``key``, and the derived numbers."""
    record = {"key_id": key_id(key), "key": key, "exponent": run.exponent, **asdict(result)}
    record["steps_done"] = result.steps_done
    median = result.median_step_time
    record["median_step_ms"] = None if median is None else 1e3 * median
    record["state_mib"] = result.state_bytes / MIB
    record["final_smoothed_loss"] = result.smoothed_loss[-1] if result.smoothed_loss else None
    last = result.evals[-1] if result.evals else {}
    record["final_val_loss"] = last.get("loss")
    record["final_val_accuracy"] = last.get("accuracy")
    record["final_val_step"] = last.get("step")
    return record


def table_columns(steps: int) -> list[int]:
    """The steps whose validation loss the table shows: every second validation, ending at the last."""
    return eval_steps(steps)[2::2]


def _number(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _range(spread: dict, spec: str) -> str:
    return "-" if spread["min"] is None else f"{spread['min']:{spec}}-{spread['max']:{spec}}"


def _to_baseline(steps: dict | None) -> str:
    if steps is None:
        return "-"
    if steps["steps"] is None:
        return "never"
    return "-" if steps["vs_baseline"] is None else f"{steps['vs_baseline']:.2f}x"


def format_table(summaries: dict[str, dict], columns: list[int], target: float, baseline: str, grid: list[int],
                 seeds: list[int]) -> str:
    """The results table, one row per optimizer at its best lr (see ``summary``), and its notes."""
    sweep, several = len(grid) > 1, len(seeds) > 1
    with_accuracy = any(s["final_val_accuracy"] is not None for s in summaries.values())
    header = (["optimizer", "lr"] + (["lr x"] if sweep else []) + [f"val@{c}" for c in columns]
              + (["val range"] if several else []) + (["val acc"] if with_accuracy else [])
              + ["train", "to target"] + (["steps range", "reached"] if several else []) + [f"to {baseline} loss"]
              + ["time to target", "ms/step", f"vs {baseline}", "state MiB"] + (["verdict"] if several else [])
              + ["status"])
    rows = []
    for name, s in summaries.items():
        steps = s["steps_to_target"]
        rows.append(
            [name, format(s["lr"], ".3g")] + ([factor_label(s["exponent"]) + ("!" if s["edge"] else "")] if sweep else [])
            + [_number(s["val_at"].get(c), ".4f") for c in columns]
            + ([_range(s["final_val_loss"], ".4f")] if several else [])
            + ([_number(s["final_val_accuracy"], ".2%")] if with_accuracy else [])
            + [_number(s["final_smoothed_loss"], ".4f"), _number(steps["mean"], ".0f", "not reached")]
            + ([_range(steps, "d"), f"{steps['reached']}/{steps['of']}"] if several else [])
            + [_to_baseline(s["steps_to_baseline_loss"])]
            + [_number(s["time_to_target_s"], ".1f") + ("s" if s["time_to_target_s"] is not None else ""),
               _number(s["median_step_ms"], ".1f"),
               _number(s["step_time_vs_baseline"], ".2f") + ("x" if s["step_time_vs_baseline"] is not None else ""),
               format(s["state_mib"], ".2f")]
            + ([s["verdict"] or "-"] if several else []) + [s["status"]]
        )
    notes = [f"val@N: validation loss after N steps; train: smoothed training loss at the end; "
             f"to target: first step with smoothed training loss <= {target:g}; time to target: those steps x "
             f"the median step time measured on this device (ms/step); vs {baseline}: step time ratio; "
             f"state MiB: optimizer state; to {baseline} loss: steps to {baseline}'s final smoothed training "
             f"loss, as a multiple of {baseline}'s own steps to it ('never': not within the run)."]
    if sweep:
        notes.append(f"lr sweep: each optimizer's default lr times {describe_grid(len(grid))}; lr, lr x: the best "
                     f"of them ({SELECTION_RULE}); '!': the best is at the edge of the grid.")
    if several:
        notes.append(f"seeds {', '.join(map(str, seeds))}: val@N, train, to target are means over the seeds; "
                     f"val range, steps range: min-max over the seeds (steps: over those that reached the target); "
                     f"verdict {TIE_RULE}.")
    if not sweep and not several:
        notes.append("one seed, each optimizer at its default lr (not tuned here): --sweep 5 tunes every lr, "
                     "--seeds 3 shows the spread, --thorough does both.")
    if sweep:
        notes += [f"{name}: at {s['lr_of']}'s best lr (its lr is {s['lr_of']}'s)"
                  for name, s in summaries.items() if s["lr_of"] is not None]
    notes += [f"{name}: best lr at the edge of the grid ({factor_label(s['exponent'])}): widen the sweep "
              f"(--sweep {len(grid) + 2})" for name, s in summaries.items() if s["edge"]]
    notes += [f"{name}: {message}" for name, s in summaries.items() for message in s["messages"]]
    text = _align(header, rows) + "\n\n" + "\n".join(notes)
    if sweep:
        text += "\n\n" + format_sweep(summaries, grid)
    return text


def format_sweep(summaries: dict[str, dict], grid: list[int]) -> str:
    """Mean final validation loss per optimizer and grid point ('*' the best; 'n bad': seeds that diverged
    or failed; '-': no seed finished)."""
    header = ["lr sweep"] + [factor_label(e) for e in grid]
    rows = []
    for name, s in summaries.items():
        row = [name]
        for e in grid:
            point = s["sweep"].get(e)
            if point is None:
                row.append("not run")
                continue
            cell = _number(point["mean_final_val_loss"], ".4f") + ("*" if e == s["exponent"] else "")
            row.append(cell + (f" ({point['not_ok']} bad)" if 0 < point["not_ok"] < point["seeds"] else ""))
        rows.append(row)
    return (_align(header, rows) + "\n" + "mean final validation loss at each lr of the sweep; *: the best; "
            "'n bad': seeds that diverged or failed; '-': none finished.")


def _align(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json(path: str, document: dict) -> None:
    """Write ``document`` as standard JSON (non-finite numbers as null)."""
    with open(path, "w") as f:
        json.dump(_finite_or_none(document), f, indent=1, allow_nan=False)
        f.write("\n")


def _band(curves: list[list[float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max over ``curves`` (of any lengths) at each step, finite values only."""
    steps, mean, low, high = [], [], [], []
    for i in range(max(map(len, curves), default=0)):
        values = [c[i] for c in curves if i < len(c) and math.isfinite(c[i])]
        if values:
            steps.append(i + 1)
            mean.append(sum(values) / len(values))
            low.append(min(values))
            high.append(max(values))
    return steps, mean, low, high


def write_plot(path: str, summaries: dict[str, dict], records: list[dict], target: float, title: str,
               grid: list[int]) -> None:
    """A PNG of every optimizer at its best lr: smoothed training loss (mean over the seeds as a line,
    min-max as a shaded band) and mean validation loss (markers) against step and against training
    time (step x median step time); the target as a dotted line. With a sweep, a third panel: mean
    final validation loss against the lr factor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if len(grid) > 1 else 2, figsize=(18 if len(grid) > 1 else 12, 4.5),
                             constrained_layout=True)
    tops = []
    for name, s in summaries.items():
        runs = [r for r in records if r["optimizer"] == name and r["exponent"] == s["exponent"]
                and r["seed"] in s["seeds_used"]]
        steps, mean, low, high = _band([r["smoothed_loss"] for r in runs])
        if not steps:
            continue
        tops.append(mean[0])
        seconds = (s["median_step_ms"] or 0.0) / 1e3
        evals = {}
        for r in runs:
            for e in r["evals"]:
                if e["loss"] is not None and math.isfinite(e["loss"]):
                    evals.setdefault(e["step"], []).append(e["loss"])
        for ax, scale in ((axes[0], 1.0), (axes[1], seconds)):
            xs = [x * scale for x in steps]
            (line,) = ax.plot(xs, mean, label=f"{name} lr {s['lr']:.3g} ({s['status']})", linewidth=1.2)
            if len(runs) > 1:
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            ax.plot([k * scale for k in evals], [sum(v) / len(v) for v in evals.values()], "o", markersize=3,
                    color=line.get_color())
            if s["status"] != "ok":
                ax.plot(xs[-1], mean[-1], "x", markersize=9, color=line.get_color())
    for ax, xlabel in ((axes[0], "step"), (axes[1], "training time (s): step x median step time")):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (lines: smoothed train, dots: validation)")
        if tops:
            ax.set_ylim(top=1.05 * max(tops))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if len(grid) > 1:
        ax = axes[2]
        for name, s in summaries.items():
            points = [(GRID_RATIO ** e, p["mean_final_val_loss"]) for e, p in s["sweep"].items()
                      if p["mean_final_val_loss"] is not None]
            if points:
                (line,) = ax.plot(*zip(*points), "o-", markersize=3, linewidth=1, label=name)
                best = s["sweep"][s["exponent"]]["mean_final_val_loss"]
                if best is not None:
                    ax.plot(GRID_RATIO ** s["exponent"], best, "*", markersize=10, color=line.get_color())
        ax.set_xscale("log", base=GRID_RATIO)
        ax.set_xlabel("lr / default lr")
        ax.set_ylabel("mean final validation loss (*: best)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: Statuses of a cached run that ``load_cache`` serves again (failed and interrupted runs are repeated).
REUSED_STATUSES = ("ok", "diverged")


def _nan_for_none(values: list) -> list[float]:
    return [math.nan if v is None else v for v in values]


def load_cache(path: str) -> dict[str, dict]:
    """The reusable run records of the ``results.json`` at ``path`` (its ``runs`` and ``other_runs``)
    by ``key_id``; empty when the file is absent. The JSON's nulls in loss curves become NaN again."""
    try:
        with open(path) as f:
            document = json.load(f)
    except FileNotFoundError:
        return {}
    cache = {}
    for record in document.get("runs", []) + document.get("other_runs", []):
        if record.get("status") in REUSED_STATUSES and "key_id" in record:
            for name in ("train_loss", "smoothed_loss"):
                record[name] = _nan_for_none(record[name])
            for e in record["evals"]:
                e["loss"] = math.nan if e["loss"] is None else e["loss"]
            cache[record["key_id"]] = record
    return cache
