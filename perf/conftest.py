"""pytest set-up of the benchmark suite (see perf/README.md).

perf.config runs first: it picks the mode (GPU: full; no GPU: smoke) and, for the smoke run, sets
TRITON_INTERPRET=1 before anything imports triton.
"""

from perf import config as perf_config  # noqa: I001  (must come before anything that imports triton)

import pytest
import torch

from perf import timing
from perf.bench import Bench
from perf.results import REPO, Recorder, results_folder, slug

_RECORDER = pytest.StashKey[Recorder]()
_REPORT = pytest.StashKey[dict]()
DEFAULT_BENCHMARK_STORAGE = "file://./.benchmarks"


# ----------------------------------------------------------------------------- options and set-up


def pytest_addoption(parser):
    group = parser.getgroup("kfopt perf")
    group.addoption("--perf-compare-fail", metavar="PCT", type=float, default=None,
                    help="kfopt perf: fail when a case's median is more than PCT percent slower than its latest "
                         "earlier measurement in perf/results/<device-kind>.jsonl (works without pytest-benchmark)")


class _NoBenchmarkPlugin:
    """Provides ``benchmark`` = None when pytest-benchmark is not installed (or disabled)."""

    @pytest.fixture
    def benchmark(self):
        return None


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(_NoBenchmarkPlugin(), "kfopt-perf-no-benchmark")
        timer = "cuda-events (perf.timing.measure_rounds)"
    else:
        timer = "pytest-benchmark pedantic + perf.timing.cuda_event_clock"
        # saved runs (and so --benchmark-compare) go per GPU kind, unless a storage was given
        if not perf_config.SMOKE and config.getoption("benchmark_storage") == DEFAULT_BENCHMARK_STORAGE:
            kind = slug(torch.cuda.get_device_name())
            config.option.benchmark_storage = f"file://{REPO / '.benchmarks' / kind}"
    config.stash[_RECORDER] = Recorder(perf_config.MODE, perf_config.DEVICE, "none" if perf_config.SMOKE else timer)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["gpu_kind"] = slug(torch.cuda.get_device_name())
        machine_info["cuda"] = torch.version.cuda
    import triton
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__


def pytest_collection_modifyitems(config, items):
    if perf_config.SMOKE or not config.pluginmanager.hasplugin("benchmark"):
        return
    for item in items:
        if "bench" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(timer=timing.cuda_event_clock))


def pytest_report_header(config):
    lines = [f"kfopt perf: mode={perf_config.MODE}, device={perf_config.DEVICE}, "
             f"autotune cache={perf_config.AUTOTUNE_CACHE}"]
    if perf_config.SMOKE:
        lines.append(f"kfopt perf: {no_timings_message()}")
    return lines


def no_timings_message() -> str:
    if perf_config.HAS_GPU:
        return "no timings were taken (KFOPT_PERF_MODE=smoke): smoke run through the Triton interpreter"
    return perf_config.NO_TIMINGS_MESSAGE


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def device() -> torch.device:
    return perf_config.DEVICE


@pytest.fixture(scope="session")
def recorder(request) -> Recorder:
    return request.config.stash[_RECORDER]


@pytest.fixture(scope="session")
def ceilings(recorder):
    """The machine's copy bandwidth and matmul rates (None in the smoke run)."""
    if perf_config.SMOKE:
        return None
    recorder.ceilings = timing.measure_ceilings()
    return recorder.ceilings


@pytest.fixture
def bench(benchmark, recorder, ceilings) -> Bench:
    return Bench(benchmark, recorder)


# ----------------------------------------------------------------------------- end of session


def pytest_sessionfinish(session, exitstatus):
    rec: Recorder = session.config.stash.get(_RECORDER, None)
    if rec is None or not rec.records:
        return
    rec.finalize()
    # an untimed run (smoke, --benchmark-disable) never touches the committed history in perf/results/
    folder = results_folder(perf_config.SMOKE or not rec.timed(), perf_config.TMP_DIR)
    report = {"jsonl": rec.write_jsonl(folder), "png": rec.write_png(folder), "compare": None}
    fail_pct = session.config.getoption("perf_compare_fail")
    if fail_pct is not None and rec.timed():
        lines, regressed = rec.compare_with_previous(report["jsonl"], fail_pct)
        report["compare"] = lines
        if regressed:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config.stash[_REPORT] = report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rec: Recorder = config.stash.get(_RECORDER, None)
    report = config.stash.get(_REPORT, None)
    if rec is None or report is None:
        return
    tr = terminalreporter
    tr.section("kfopt perf results")
    for line in rec.table_lines():
        tr.write_line(line)
    tr.write_line("")
    tr.write_line("targets (benchmarks, not tests):")
    for line in rec.target_lines():
        tr.write_line(line)
    tr.write_line("")
    tr.write_line(f"results appended to {report['jsonl']}")
    tr.write_line(f"plot: {report['png']}")
    if report["compare"]:
        for line in report["compare"]:
            tr.write_line(line)
    if perf_config.SMOKE:
        checked = sum(1 for r in rec.records if r.get("check"))
        tr.write_line(f"smoke run: {len(rec.records)} cases ran; {checked} were checked against a reference or "
                      f"float64 result, the others are the references themselves")
        tr.write_sep("!", no_timings_message().upper(), red=True, bold=True)
