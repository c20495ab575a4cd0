"""Which configuration this run uses. Imported first by perf/conftest.py, before anything imports triton.

``KFOPT_PERF_MODE`` (environment):

* unset  -> ``full`` when ``torch.cuda.is_available()``, else ``smoke``;
* ``full``  -> every size of the issue (GPU required);
* ``quick`` -> one size per family, for iterating on a kernel (GPU required);
* ``smoke`` -> tiny sizes, kernels through Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` is
  set here), outputs checked against the baselines, nothing timed, nothing written to perf/results/.

Other environment knobs: ``KFOPT_PERF_RESULTS`` (results folder; default perf/results/ on a GPU, a
temporary folder in the smoke run), ``KFOPT_PERF_AUTOTUNE_CACHE`` (tuning cache to use; default a
fresh file per run so that a stale cache never decides a config), ``KFOPT_PERF_BUDGET_S`` (wall
seconds of timed rounds per case; default 1.0 full, 0.3 quick).
"""

from __future__ import annotations

import os
import tempfile

import torch  # importing torch does not import triton

MODES = ("smoke", "quick", "full")

_requested = os.environ.get("KFOPT_PERF_MODE", "").strip().lower()
if _requested and _requested not in MODES:
    raise RuntimeError(f"KFOPT_PERF_MODE must be one of {MODES}, got {_requested!r}")
HAS_GPU: bool = torch.cuda.is_available()
MODE: str = _requested or ("full" if HAS_GPU else "smoke")
if MODE != "smoke" and not HAS_GPU:
    raise RuntimeError(f"KFOPT_PERF_MODE={MODE} needs a CUDA GPU; none is visible (unset it for the smoke run)")
SMOKE: bool = MODE == "smoke"
INTERPRETER: bool = SMOKE  # kernels run through Triton's interpreter exactly in the smoke run
DEVICE = torch.device("cpu" if SMOKE else "cuda")

if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("KFOPT_BACKEND", None)  # each case chooses its path itself

TMP_DIR: str = os.path.join(tempfile.gettempdir(), f"kfopt-perf-{os.getpid()}")  # created only when written to
AUTOTUNE_CACHE: str = os.environ.get("KFOPT_PERF_AUTOTUNE_CACHE") or os.path.join(TMP_DIR, "autotune.json")
os.environ["KFOPT_AUTOTUNE_CACHE"] = AUTOTUNE_CACHE

BUDGET_S: float = float(os.environ.get("KFOPT_PERF_BUDGET_S") or {"full": 1.0, "quick": 0.3, "smoke": 0.0}[MODE])

NO_TIMINGS_MESSAGE = "no timings were taken (no GPU): smoke run through the Triton interpreter"
