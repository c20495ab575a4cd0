#!/usr/bin/env bash
# One command that validates and measures kfopt on a GPU in under 8 minutes (perf/README.md,
# "One-command GPU check"). Installs nothing, downloads nothing: the checkout is imported as kfopt
# (kfopt.kernels -> kernels/, kfopt.autotune -> autotune/) through a folder of symbolic links put
# first on PYTHONPATH, so no pip install is needed.
#
#   bash perf/gpu_check.sh [OUTDIR]             GPU run: results appended to perf/results/<gpu>.jsonl,
#                                               plot perf/results/<gpu>.png, OUTDIR/gpu_check_summary.md
#                                               and OUTDIR/gpu_check.log
#   bash perf/gpu_check.sh --dry-run            print the plan (stages, compile counts, time estimates)
#   bash perf/gpu_check.sh --cpu-smoke [OUTDIR] the same driver on the CPU through Triton's interpreter
#   options: --only WORD[,WORD...] (items whose name contains a word), --workers N
#
# Environment: KFOPT_GPU_CHECK_DEADLINE_S (default 450: the run stops itself this many seconds after
# it started and writes what it measured), KFOPT_GPU_CHECK_TRITON_CACHE (reuse a Triton cache instead of
# a fresh one), KFOPT_PERF_BUDGET_S (seconds of timed rounds per case, default 0.25), PYTHON.
set -u
export KFOPT_GPU_CHECK_T0="${KFOPT_GPU_CHECK_T0:-$(date +%s.%N)}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEADLINE="${KFOPT_GPU_CHECK_DEADLINE_S:-450}"

OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        -*) ;;
        *) if [ -z "$OUTDIR" ] && [ "${prev:-}" != "--only" ] && [ "${prev:-}" != "--workers" ]; then OUTDIR="$arg"; fi ;;
    esac
    prev="$arg"
done

# kfopt from this checkout, without installing it
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/kfopt-gpu-check-imports.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/kfopt"
for f in "$REPO"/kfopt/*; do
    case "$(basename "$f")" in __pycache__) continue ;; esac
    ln -s "$f" "$SHIM/kfopt/$(basename "$f")"
done
ln -s "$REPO/kernels" "$SHIM/kfopt/kernels"
ln -s "$REPO/autotune" "$SHIM/kfopt/autotune"
export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
# `python -m` would put the working directory (the checkout, whose kfopt/ has no kernels/) ahead of
# the shim: keep it off sys.path
export PYTHONSAFEPATH=1

cd "$REPO" || exit 2
case " $* " in
    *" --dry-run "*) exec "$PYTHON" -m perf.gpu_check "$@" ;;
esac

# the driver stops itself at the deadline; `timeout` is the backstop (SIGTERM: the driver writes what
# it has; SIGKILL 10 s later)
LIMIT=$(awk -v d="$DEADLINE" 'BEGIN { printf "%d", d + 20 }')
if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR"
    timeout -k 10 "$LIMIT" "$PYTHON" -u -m perf.gpu_check "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
timeout -k 10 "$LIMIT" "$PYTHON" -u -m perf.gpu_check "$@"
