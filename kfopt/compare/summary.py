"""From run records to one summary per optimizer: its best learning rate and the spread over seeds.

* Best lr (``plan.SELECTION_RULE``): per grid point the score is (number of seeds that diverged or
  failed, mean final validation loss of the others); the lowest score wins, on a tie the smaller lr.
  A best at the smallest or largest point of a grid of 2 or more is flagged ``edge``. An optimizer that
  takes another's lr (``lr_of``: the grafted entries take AdamW's) is summarised at that one's best
  grid point instead.
* At the best lr, the statistics run over the seeds whose run finished ``ok`` (over all of its seeds
  when none did): mean, min and max of the final validation loss and of the steps to the target
  (over the seeds that reached it), the median step time, and the time to the target = mean steps
  to the target x median step time (measured on this device).
* Steps to the baseline's loss: the first step whose smoothed training loss is at or below the
  baseline's final smoothed training loss (the mean over its seeds), mean over the seeds that reach it,
  and relative to the baseline's own such steps (a smoothed loss fluctuates: the baseline itself gets
  there before its last step), so ``0.9x`` reads "the baseline's final loss in 0.9 of its steps".
* Verdict against the baseline (``plan.TIE_RULE``): with 2 or more seeds on both sides, ``tie`` when
  the min-max ranges of the final validation loss overlap, else ``better`` or ``worse`` by the mean.
"""

from __future__ import annotations

import math
import statistics

from .runner import steps_to_target


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _spread(values: list[float]) -> dict:
    return {"mean": _mean(values), "min": min(values, default=None), "max": max(values, default=None)}


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def score(runs: list[dict]) -> tuple[int, float]:
    """(seeds not ``ok``, mean final validation loss of the ``ok`` ones; inf when none)."""
    ok = [r["final_val_loss"] for r in runs if r["status"] == "ok" and _finite(r["final_val_loss"])]
    return len(runs) - len(ok), statistics.fmean(ok) if ok else math.inf


def _status(runs: list[dict]) -> str:
    counts = {}
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if len(runs) == 1:
        return runs[0]["status"]
    if list(counts) == ["ok"]:
        return "ok"
    return ",".join(f"{status}{'' if n == len(runs) else f':{n}/{len(runs)}'}" for status, n in counts.items())


def summarize_one(runs_by_exponent: dict[int, list[dict]], exponents: list[int], target: float,
                  at: int | None = None) -> dict:
    """The summary of one optimizer from its runs per grid exponent (``exponents``: the grid run), at its
    best grid point, or at exponent ``at`` where it has runs there (never flagged ``edge``)."""
    scored = {e: score(runs) for e, runs in runs_by_exponent.items() if runs}
    best = at if at in scored else min(scored, key=lambda e: (scored[e], e))
    runs = sorted(runs_by_exponent[best], key=lambda r: r["seed"])
    used = [r for r in runs if r["status"] == "ok"] or runs
    finals = [r["final_val_loss"] for r in used if _finite(r["final_val_loss"])]
    reached = [s for s in (steps_to_target(r["smoothed_loss"], target) for r in used) if s is not None]
    step_ms = [r["median_step_ms"] for r in used if r["median_step_ms"] is not None]
    ms = statistics.median(step_ms) if step_ms else None
    columns = sorted({e["step"] for r in used for e in r["evals"]})
    val_at = {s: _mean([e["loss"] for r in used for e in r["evals"] if e["step"] == s and _finite(e["loss"])])
              for s in columns}
    accuracy = [r["final_val_accuracy"] for r in used if r["final_val_accuracy"] is not None]
    train = [r["final_smoothed_loss"] for r in used if _finite(r["final_smoothed_loss"])]
    steps_mean = _mean(reached)
    return {
        "lr": runs[0]["lr"], "exponent": best,
        "edge": at not in scored and len(exponents) > 1 and best in (min(exponents), max(exponents)),
        "seeds": [r["seed"] for r in runs], "seeds_used": [r["seed"] for r in used], "status": _status(runs),
        "final_val_loss": _spread(finals), "val_at": val_at, "final_val_accuracy": _mean(accuracy),
        "final_smoothed_loss": _mean(train),
        "steps_to_target": {**_spread(reached), "reached": len(reached), "of": len(used)},
        "median_step_ms": ms,
        "time_to_target_s": None if steps_mean is None or ms is None else steps_mean * ms / 1e3,
        "state_mib": max(r["state_mib"] for r in runs),
        "sweep": {e: {"lr": rs[0]["lr"], "not_ok": scored[e][0], "seeds": len(rs),
                      "mean_final_val_loss": None if math.isinf(scored[e][1]) else scored[e][1]}
                  for e, rs in sorted(runs_by_exponent.items()) if rs},
        "messages": [f"seed {r['seed']}: {r['status']}: {r['message']}" if len(runs) > 1
                     else f"{r['status']}: {r['message']}" for r in runs if r["message"]],
    }


def verdict(summary: dict, base: dict) -> str | None:
    """``better``, ``worse`` or ``tie`` against ``base`` by ``plan.TIE_RULE``; None with fewer than 2 seeds."""
    mine, theirs = summary["final_val_loss"], base["final_val_loss"]
    if len(summary["seeds_used"]) < 2 or len(base["seeds_used"]) < 2 or mine["mean"] is None or theirs["mean"] is None:
        return None
    if mine["min"] <= theirs["max"] and theirs["min"] <= mine["max"]:
        return "tie"
    return "better" if mine["mean"] < theirs["mean"] else "worse"


def summarize(records: list[dict], names: list[str], exponents: list[int], target: float,
              baseline: str, lr_of: dict[str, str] | None = None) -> dict[str, dict]:
    """The summary per optimizer of ``names`` that has a run (in ``names`` order), with the step-time
    ratio and the verdict against ``baseline``. ``lr_of[name]``: the optimizer whose lr ``name`` takes;
    ``name`` is summarised at that one's best grid point (``lr_of`` in its summary), not at its own."""
    lr_of = lr_of or {}
    summaries = {}
    for name in sorted(names, key=lambda n: n in lr_of):  # those whose lr others take first
        by_exponent = {e: [r for r in records if r["optimizer"] == name and r["exponent"] == e] for e in exponents}
        leader = summaries.get(lr_of.get(name))
        at = leader["exponent"] if leader is not None and by_exponent.get(leader["exponent"]) else None
        if any(by_exponent.values()):
            summaries[name] = {**summarize_one(by_exponent, exponents, target, at=at),
                               "lr_of": None if at is None else lr_of[name]}
    summaries = {name: summaries[name] for name in names if name in summaries}
    base = summaries.get(baseline)
    level = None if base is None else base["final_smoothed_loss"]

    def steps_to_base(name: str) -> float | None:
        s = summaries[name]
        reached = [steps_to_target(r["smoothed_loss"], level) for r in records if r["optimizer"] == name
                   and r["exponent"] == s["exponent"] and r["seed"] in s["seeds_used"]]
        return _mean([n for n in reached if n is not None])

    own = None if level is None else steps_to_base(baseline)
    for name, s in summaries.items():
        mine = None if level is None else steps_to_base(name)
        s["steps_to_baseline_loss"] = None if level is None else {  # None: no baseline loss to reach
            "steps": mine, "vs_baseline": mine / own if mine is not None and own else None}
        base_ms = None if base is None else base["median_step_ms"]
        s["step_time_vs_baseline"] = None if s["median_step_ms"] is None or not base_ms else s["median_step_ms"] / base_ms
        s["verdict"] = None if base is None or name == baseline else verdict(s, base)
    return summaries
