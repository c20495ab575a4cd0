"""Results of one run: records, baseline ratios, targets, the JSON-lines file, the plot, the table.

One record per (case, implementation); fields (JSON lines, one object per line, appended to
``perf/results/<device-kind>.jsonl``):

  run_id, timestamp, mode, family (elementwise | factor | step | sharded | autotune | ceiling), method, impl,
  role (kernel | baseline), case ("family/method"), group (records compared with each other),
  shape (label), params, dtype, device_name, device_kind, torch, triton, python, cuda, commit,
  commit_dirty, timer, median_s, min_s, max_s, iqr_s, rounds, host_s, latency_s, host_bound, bytes,
  compulsory_bytes, flops, floor_s, floor_fraction, bytes_per_s, flops_per_s, ratios
  ({"method/impl": baseline time / this time}), per_byte_ratios, check ({"max_rel_err", "against"}),
  targets ([{"target", "value", "threshold", "met", "note"}]), extra (per family: e.g. the step
  cases' state_bytes, state_bytes_vs_adamw_fused, iteration_latency_s, amortised_step_s; the sharded
  cases' collectives, collective_bytes, calls, collective_s, collective_share).

Timings are ``null`` in the smoke run (which writes to a temporary folder, never to perf/results/).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
import uuid
from pathlib import Path

import torch

from perf.cases import SHARED_BASELINES, STATE_BASELINE, TARGETS

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Who measured: device, versions, commit (read-only git commands)."""
    import triton
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device_name": name,
        "device_kind": slug(name),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "commit_dirty": bool(status) if status is not None else None,
    }


class Recorder:
    """Collects records during the session; ``finalize`` adds ratios and targets."""

    def __init__(self, mode: str, device: torch.device, timer: str):
        self.mode, self.timer = mode, timer
        self.env = environment(device)
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.records: list[dict] = []
        self.ceilings: dict | None = None
        self.targets: list[dict] = []
        self.finalized = False

    def add(self, **fields) -> dict:
        rec = {"run_id": self.run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": self.mode,
               **self.env, "timer": self.timer if fields.get("median_s") is not None else None,
               "ratios": {}, "per_byte_ratios": {}, "targets": [], "extra": {}}
        rec.update(fields)
        rec["case"] = f"{rec['family']}/{rec['method']}"
        self._floor(rec)
        self.records.append(rec)
        return rec

    def _floor(self, rec: dict) -> None:
        t = rec.get("median_s")
        c = self.ceilings
        if t is None or not c:
            return
        floors = []
        if rec.get("bytes"):
            floors.append(rec["bytes"] / c["copy_bytes_per_s"])
            rec["bytes_per_s"] = rec["bytes"] / t
        if rec.get("flops"):
            rate = c["matmul_flops_per_s"].get(rec.get("flops_dtype") or "")
            rec["flops_per_s"] = rec["flops"] / t
            if rate:
                floors.append(rec["flops"] / rate)
        if floors:
            rec["floor_s"] = max(floors)
            rec["floor_fraction"] = rec["floor_s"] / t

    # -- ratios and targets -------------------------------------------------------------------

    def finalize(self) -> None:
        if self.finalized:
            return
        self.finalized = True
        self._state_ratios()
        timed = [r for r in self.records if r.get("median_s")]
        by_group: dict[str, list[dict]] = {}
        for r in timed:
            by_group.setdefault(r["group"], []).append(r)
        for r in timed:
            if r["role"] != "kernel":
                continue
            shared = SHARED_BASELINES.get(r["family"], ())
            for b in by_group.get(r["group"], []):
                if b["role"] != "baseline" or (b["method"] != r["method"] and b["method"] not in shared):
                    continue
                label = f"{b['method']}/{b['impl']}"
                r["ratios"][label] = b["median_s"] / r["median_s"]
                if b["method"] != r["method"] and r.get("bytes") and b.get("bytes"):
                    r["per_byte_ratios"][label] = (r["bytes"] / r["median_s"]) / (b["bytes"] / b["median_s"])
        self.targets = []
        for target in TARGETS:
            hits = [r for r in timed if target.select(r)]
            rows = []
            for r in hits:
                value = target.value(r)
                if value is None:
                    continue
                met = value >= target.threshold if target.op == ">=" else value <= target.threshold
                gap = (target.threshold - value) if target.op == ">=" else (value - target.threshold)
                if met:
                    note = "met"
                elif target.unit == "x":
                    note = f"missed by {gap:.2f}x ({100 * gap / target.threshold:.0f}% of the target)"
                else:
                    note = f"missed by {100 * gap:.0f} percentage points"
                entry = {"target": target.name, "value": value, "threshold": target.threshold, "op": target.op,
                         "met": met, "note": note}
                r["targets"].append(entry)
                rows.append({**entry, "case": r["case"], "impl": r["impl"], "shape": r["shape"], "dtype": r["dtype"]})
            self.targets.append({"target": target.name, "text": target.text, "rows": rows,
                                 "note": None if rows else "not measured (no timed kfopt case of it ran)"})

    def _state_ratios(self) -> None:
        """Optimizer-state bytes of every step case relative to AdamW(fused)'s in the same group (also in
        the smoke run: memory is not a timing)."""
        bases = {r["group"]: r for r in self.records
                 if r["family"] == "step" and (r["method"], r["impl"]) == STATE_BASELINE}
        for r in self.records:
            base = bases.get(r["group"])
            if r["family"] == "step" and base and base["extra"].get("state_bytes"):
                r["extra"]["state_bytes_vs_adamw_fused"] = r["extra"]["state_bytes"] / base["extra"]["state_bytes"]

    # -- output -------------------------------------------------------------------------------

    def write_jsonl(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.env['device_kind']}.jsonl"
        with open(path, "a") as f:
            if self.ceilings:
                f.write(json.dumps(self._ceiling_record()) + "\n")
            for r in self.records:
                f.write(json.dumps(r, default=str) + "\n")
        return path

    def _ceiling_record(self) -> dict:
        return {"run_id": self.run_id, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": self.mode,
                **self.env, "family": "ceiling", "method": "machine", "impl": "torch", "role": "ceiling",
                "case": "ceiling/machine", "extra": self.ceilings}

    def write_png(self, folder: Path) -> Path | str:
        """Floor fraction and baseline ratios per kfopt case; returns the path or why there is none."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "matplotlib is not installed: no plot"
        kernels = [r for r in self.records if r["role"] == "kernel" and r["family"] not in ("autotune", "sharded")]
        if not kernels:
            return "no kfopt cases ran: no plot"
        labels = [f"{r['family']}: {r['method']} {r['shape']} {r['dtype']}" for r in kernels]

        def category(rec, key):  # "foreach", "reference", ... for the method's own baselines
            method, impl = key.split("/", 1)
            return impl if method == rec["method"] else key

        categories = sorted({category(r, k) for r in kernels for k in r["ratios"]})
        height = max(3.0, 0.32 * len(kernels) + 2.0)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(17, height), sharey=True, layout="constrained")
        y = list(range(len(kernels)))
        fractions = [r.get("floor_fraction") for r in kernels]
        ax1.barh(y, [f or 0.0 for f in fractions], color="tab:blue")
        for i, (f, rec) in enumerate(zip(fractions, kernels)):
            missing = " not timed" if rec.get("median_s") is None else " no bytes/flops model"
            ax1.text(0.0 if f is None else min(f, 1.15), i, missing if f is None else f" {100 * f:.0f}%",
                     va="center", fontsize=6, clip_on=True)
        ax1.axvline(1.0, color="black", lw=0.8)
        ax1.set_xlim(0, 1.15)
        ax1.set_xlabel("fraction of the floor achieved (floor = max(bytes / copy bandwidth, flops / matmul rate))")
        ax1.set_yticks(y, labels, fontsize=7)
        ax1.set_ylim(len(kernels) - 0.5, -0.5)  # first case on top, no empty rows
        width = 0.8 / max(1, len(categories))
        for k, cat in enumerate(categories):
            ys, vals = [], []
            for i, rec in enumerate(kernels):
                for key, v in rec["ratios"].items():
                    if category(rec, key) == cat:
                        ys.append(i - 0.4 + (k + 0.5) * width)
                        vals.append(v)
            ax2.barh(ys, vals, height=width, label=f"vs {cat}")
            for yy, v in zip(ys, vals):
                ax2.text(v, yy, f" {v:.3g}x", va="center", fontsize=5)
        ax2.axvline(1.0, color="black", lw=0.8)
        ax2.set_xscale("log")
        ax2.set_xlabel("speed-up over each baseline (baseline time / kfopt time; > 1: kfopt faster)")
        if categories:
            ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        title = f"kfopt perf {self.run_id}: {self.env['device_name']}, torch {self.env['torch']}, " \
                f"triton {self.env['triton']}, commit {self.env['commit']}"
        if self.mode == "smoke":
            title += " -- SMOKE RUN, NO TIMINGS"
        elif not self.timed():
            title += " -- NO TIMINGS"
        fig.suptitle(title, fontsize=9)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.env['device_kind']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def timed(self) -> bool:
        """Whether any case of this run was timed (not so in the smoke run or with --benchmark-disable)."""
        return any(r.get("median_s") for r in self.records)

    def table_lines(self) -> list[str]:
        rows = [("case", "impl", "shape", "dtype", "device ms", "host ms", "GB/s", "TFLOP/s", "floor",
                 "state/AdamW", "speed-up vs baselines")]
        order = lambda r: (r["family"], r["method"], r["shape"], r["dtype"], r["role"] != "kernel")  # noqa: E731
        for r in sorted(self.records, key=order):
            if r["family"] in ("autotune", "sharded"):
                continue
            ratios = " ".join(f"{k}:{v:.3g}x" for k, v in r["ratios"].items())
            rows.append((r["case"], r["impl"], r["shape"], r["dtype"], _ms(r.get("median_s")), _ms(r.get("host_s")),
                         _num(r.get("bytes_per_s"), 1e9), _num(r.get("flops_per_s"), 1e12),
                         _pct(r.get("floor_fraction")), _times(r["extra"].get("state_bytes_vs_adamw_fused")),
                         ratios or ("-" if r["role"] == "kernel" else "")))
        lines = _format(rows)
        tuned = [r for r in self.records if r["family"] == "autotune"]
        if tuned:
            lines.append("")
            arows = [("autotune", "shape", "dtype", "first call s (compile+tune)", "next process first call s",
                      "cached call ms", "configs")]
            for r in tuned:
                e = r["extra"]
                arows.append((r["method"], r["shape"], r["dtype"], _num(e.get("first_call_s"), 1),
                              _num(e.get("second_process_first_call_s"), 1), _ms(e.get("cached_call_s")),
                              str(e.get("n_configs", "-"))))
            lines += _format(arows)
        sharded = [r for r in self.records if r["family"] == "sharded"]
        if sharded:
            lines.append("")
            srows = [("sharded step", "shape", "backend", "collectives", "bytes/rank", "step ms", "in collectives ms",
                      "share")]
            for r in sharded:
                e = r["extra"]
                srows.append((r["method"], r["shape"], e["backend"], str(e["collectives"]), str(e["collective_bytes"]),
                              _ms(r.get("median_s")), _ms(e.get("collective_s")), _pct(e.get("collective_share"))))
            lines += _format(srows)
        return lines

    def target_lines(self) -> list[str]:
        lines = []
        for t in self.targets:
            if not t["rows"]:
                lines.append(f"[----] {t['text']}: {t['note']}")
                continue
            met = sum(r["met"] for r in t["rows"])
            lines.append(f"[{'MET ' if met == len(t['rows']) else 'MISS'}] {t['text']}: {met}/{len(t['rows'])} cases")
            for r in t["rows"]:
                tgt = next(x for x in TARGETS if x.name == t["target"])
                lines.append(f"    {r['case']} {r['impl']} {r['shape']} {r['dtype']}: "
                             f"{_fmt_value(r['value'], tgt)} ({r['op']} {_fmt_value(r['threshold'], tgt)}) {r['note']}")
        return lines

    # -- regression check without pytest-benchmark ---------------------------------------------

    def compare_with_previous(self, path: Path, fail_pct: float) -> tuple[list[str], bool]:
        """Compare each timed case's median with its latest earlier measurement in ``path`` (one file
        per device kind); returns (report lines, whether any median regressed by more than ``fail_pct``%)."""
        previous: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("run_id") == self.run_id or not r.get("median_s") or r.get("mode") != self.mode:
                    continue
                key = _key(r)
                if key not in previous or r["timestamp"] >= previous[key]["timestamp"]:
                    previous[key] = r
        lines, regressed, compared = [], False, 0
        for r in self.records:
            o = previous.get(_key(r))
            if not r.get("median_s") or not o:
                continue
            compared += 1
            change = 100 * (r["median_s"] / o["median_s"] - 1)
            if change > fail_pct:
                regressed = True
                lines.append(f"REGRESSION {_key(r)}: {_ms(o['median_s'])} -> {_ms(r['median_s'])} ms (+{change:.1f}%; "
                             f"before: run {o['run_id']}, commit {o.get('commit')})")
        lines.insert(0, f"--perf-compare-fail={fail_pct}: {compared} cases compared with their latest earlier "
                        f"measurement in {path}")
        if not regressed:
            lines.append(f"no median regressed by more than {fail_pct}%")
        return lines, regressed


def _key(r: dict) -> str:
    return f"{r['case']}|{r['impl']}|{r['shape']}|{r['dtype']}"


def _fmt_value(v: float, target) -> str:
    if target.unit == "x":
        return f"{v:.2f}x"
    return f"{100 * v:.0f}%"


def _ms(v):
    return "-" if v is None else f"{1e3 * v:.3f}"


def _num(v, scale):
    return "-" if v is None else f"{v / scale:.1f}"


def _times(v):
    return "-" if v is None else f"{v:.2f}x"


def _pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def _format(rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def results_folder(untimed: bool, tmp_dir: str) -> Path:
    """``KFOPT_PERF_RESULTS``, else perf/results/ for a timed run and a temporary folder otherwise."""
    if os.environ.get("KFOPT_PERF_RESULTS"):
        return Path(os.environ["KFOPT_PERF_RESULTS"])
    return Path(tmp_dir) / "results" if untimed else RESULTS_DIR

