"""Repeat every multi-process test (marker ``distributed``) N times, each round a fresh pytest process.

    python tests/stress_distributed.py 30           # 30 rounds, one after the other
    python tests/stress_distributed.py 30 --load    # the same, with the rest of the suite running beside it
    python tests/stress_distributed.py 10 -k sharded  # only the distributed tests pytest's -k selects

A round runs ``python -m pytest -m distributed`` and records every test's outcome from its JUnit XML
(fixtures with module scope, which launch the processes once per file, start anew each round). The
script prints one line per round, then each test's pass count, and exits 1 when any test failed or
errored in any round. ``--load`` keeps ``python -m pytest -m "not distributed"`` running in a loop
beside the rounds, so the ranks compete for the cores as they do in a loaded CI run.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_round(xml: Path, select: str | None) -> dict[str, str]:
    """One pytest run of the distributed tests (``-k select`` of them if given): ``{test id: "passed" |
    "failed" | "skipped"}``."""
    subprocess.run([sys.executable, "-m", "pytest", "-m", "distributed", *(["-k", select] if select else []),
                    "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"], cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    if not xml.exists():
        return {"pytest itself (no report written)": "failed"}
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[test] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds
                          else "passed")
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", type=int)
    parser.add_argument("--load", action="store_true", help="run the rest of the suite beside the rounds")
    parser.add_argument("-k", dest="select", help="only the distributed tests pytest's -k expression selects")
    args = parser.parse_args()
    load = None
    if args.load:
        load = subprocess.Popen(["bash", "-c", f'while true; do "{sys.executable}" -m pytest -m "not distributed" '
                                 '-q -p no:cacheprovider >/dev/null 2>&1; done'], cwd=REPO, start_new_session=True)
    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(1, args.rounds + 1):
                start = time.monotonic()
                outcomes = run_round(Path(tmp) / f"round{r}.xml", args.select)
                for test, outcome in outcomes.items():
                    tally[test][outcome] += 1
                bad = sorted(t for t, o in outcomes.items() if o == "failed")
                print(f"round {r}: {len(outcomes) - len(bad)} passed, {len(bad)} failed "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
                for test in bad:
                    print(f"  FAILED {test}", flush=True)
    finally:
        if load is not None:
            os.killpg(load.pid, signal.SIGKILL)
            load.wait()
    print(f"\n{args.rounds} rounds:")
    for test, counts in sorted(tally.items()):
        print(f"  {counts['passed']:3d} passed, {counts['failed']:3d} failed, {counts['skipped']:3d} skipped  {test}")
    return 1 if any(counts["failed"] for counts in tally.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
