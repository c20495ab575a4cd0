"""The outputs of ``kfopt compare``: a record per run, the terminal table, the JSON file, the PNG plot.

The table and the plot are drawn from the same records that go into the JSON, so they agree.
Non-finite numbers (a diverged loss) are written to JSON as ``null``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

from .runner import RunResult

MIB = 2 ** 20


def run_record(result: RunResult, baseline: RunResult | None) -> dict:
    """``result`` as a dict, with the derived numbers the table shows."""
    record = asdict(result)
    record["steps_done"] = result.steps_done
    median = result.median_step_time
    record["median_step_ms"] = None if median is None else 1e3 * median
    base = None if baseline is None else baseline.median_step_time
    record["step_time_vs_baseline"] = None if median is None or not base else median / base
    record["state_mib"] = result.state_bytes / MIB
    record["final_smoothed_loss"] = result.smoothed_loss[-1] if result.smoothed_loss else None
    last = result.evals[-1] if result.evals else {}
    record["final_val_loss"] = last.get("loss")
    record["final_val_accuracy"] = last.get("accuracy")
    record["final_val_step"] = last.get("step")
    return record


def _number(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(records: list[dict], columns: list[int], target: float, baseline: str) -> str:
    """The results table: validation loss after each step in ``columns``, then the summary numbers."""
    with_accuracy = any(r["final_val_accuracy"] is not None for r in records)
    header = (["optimizer", "lr"] + [f"val@{s}" for s in columns] + (["val acc"] if with_accuracy else [])
              + ["train", "to target", "time", "ms/step", f"vs {baseline}", "state MiB", "status"])
    rows = []
    for r in records:
        val = {e["step"]: e["loss"] for e in r["evals"]}
        rows.append(
            [r["optimizer"], format(r["lr"], ".3g")]
            + [_number(val.get(s), ".4f") for s in columns]
            + ([_number(r["final_val_accuracy"], ".2%")] if with_accuracy else [])
            + [_number(r["final_smoothed_loss"], ".4f"),
               _number(r["target_step"], "d", "not reached"),
               _number(r["target_time"], ".1f", "-") + ("s" if r["target_time"] is not None else ""),
               _number(r["median_step_ms"], ".1f"),
               _number(r["step_time_vs_baseline"], ".2f") + ("x" if r["step_time_vs_baseline"] is not None else ""),
               format(r["state_mib"], ".2f"),
               r["status"]]
        )
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"val@N: validation loss after N steps; train: smoothed training loss at the end; "
             f"to target: first step with smoothed training loss <= {target:g}, time: training time to it; "
             f"ms/step: median step time; vs {baseline}: step time ratio; state MiB: optimizer state."]
    notes += [f"{r['optimizer']}: {r['status']}: {r['message']}" for r in records if r["message"]]
    return "\n".join(lines + [""] + notes)


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


def write_plot(path: str, records: list[dict], target: float, title: str) -> None:
    """A PNG with two panels, loss vs step and loss vs training time: smoothed training loss as lines,
    validation loss as markers, the target as a dotted line, a cross where a run diverged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    starts = [r["smoothed_loss"][0] for r in records if r["smoothed_loss"] and math.isfinite(r["smoothed_loss"][0])]
    for r in records:
        steps = list(range(1, r["steps_done"] + 1))
        times, total = [], 0.0
        for t in r["step_time"]:
            total += t
            times.append(total)
        for ax, xs, key in ((axes[0], steps, "step"), (axes[1], times, "time")):
            (line,) = ax.plot(xs, r["smoothed_loss"], label=f"{r['optimizer']} ({r['status']})", linewidth=1.2)
            ax.plot([e[key] for e in r["evals"]], [e["loss"] for e in r["evals"]], "o", markersize=3,
                    color=line.get_color())
            if r["status"] == "diverged" and xs:
                finite = [v for v in r["smoothed_loss"] if math.isfinite(v)]
                ax.plot(xs[-1], min(finite[-1], 1.05 * max(starts)) if finite else 0.0, "x", markersize=9,
                        color=line.get_color())
    for ax, xlabel in ((axes[0], "step"), (axes[1], "training time (s)")):
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (lines: smoothed train, dots: validation)")
        if starts:
            ax.set_ylim(top=1.05 * max(starts))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
