"""Mutation checks: put a known bug into a scratch copy of the repository, run the tests that should
catch it there, and report whether they fail (tests/README.md lists the mutations and why).

    python tests/mutations.py --list
    python tests/mutations.py                 # every mutation (a few minutes)
    python tests/mutations.py rank1-no-norm-bound singd-no-world-scaling

The working tree is never modified: each mutation gets a fresh copy in a temporary folder. The
editable install maps ``kfopt.kernels``/``kfopt.autotune`` to this checkout's ``kernels/`` and
``autotune/``; in the copy, ``kfopt/kernels`` and ``kfopt/autotune`` are symlinks to the copy's own
folders, found first on ``sys.path`` (the copy is the working directory), and every run first checks
that the mutated module is imported from the copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    edits: list[tuple[str, str, str]]  # (file, old text (must occur once), new text)
    tests: list[str]  # pytest arguments, run in the copy; they must fail
    module: str  # a module the edits touch, checked to be imported from the copy


LAMB_STORE = "        tl.store(p_ptr + offs, (w - step_size * u).to(P_DT), mask=mask)\n"
LARS_STORE = "        tl.store(p_ptr + offs, (w - update).to(P_DT), mask=mask)\n"


def half_single(method: str) -> list[str]:
    """The 14 single-tensor kernel tests of ``method`` with bf16/fp16 parameters."""
    return ["tests/test_trust_ratio_kernels.py", "-k", f"single_tensor and not dtype0 and {method}"]


MUTATIONS = [
    Mutation("rank1-no-norm-bound",
             [("kernels/rank1_inverse.py", "definite = (den > 0) & (t_b >= 0) & (pp_b <= 2.0 * d * m_b * t_b)",
               "definite = (den > 0) & (t_b >= 0)")],
             ["tests/test_rank1_inverse.py::test_definiteness_check_of_the_stabiliser"],
             "kfopt.kernels.rank1_inverse"),
    Mutation("rank1-reference-no-norm-bound",
             [("kernels/rank1_inverse.py", "definite = (den > 0) & (t_b >= 0) & (pp_b <= 2 * d * m_b * t_b)",
               "definite = (den > 0) & (t_b >= 0)")],
             ["tests/test_rank1_inverse.py::test_definiteness_check_of_the_stabiliser"],
             "kfopt.kernels.rank1_inverse"),
    Mutation("singd-no-world-scaling",
             [("kfopt/singd.py", "layer.H_C.mul_(float(world))", "pass")],
             ["tests/test_singd.py::test_rank_average_of_statistics_equals_the_global_batch"], "kfopt.singd"),
    Mutation("lamb-16bit-params-not-written",
             [("kernels/lamb.py", LAMB_STORE, "        if P_DT == tl.float32:\n    " + LAMB_STORE)],
             half_single("lamb"), "kfopt.kernels.lamb"),
    Mutation("lars-16bit-params-not-written",
             [("kernels/lars.py", LARS_STORE, "        if P_DT == tl.float32:\n    " + LARS_STORE)],
             half_single("lars"), "kfopt.kernels.lars"),
    Mutation("lamb-record-1-minus-b1-for-b2",
             [("kernels/lamb.py", "one_minus_beta2=1.0 - self.beta2,", "one_minus_beta2=1.0 - self.beta1,")],
             ["tests/test_trust_ratio_kernels.py::test_two_steps_match_equations_written_here"],
             "kfopt.kernels.lamb"),
    Mutation("lars-kernel-and-reference-lr-for-eta",
             [("kernels/lars.py", "tl.load(norms_ptr + tid * 2 + 1), tl.load(h + H.eta),",
               "tl.load(norms_ptr + tid * 2 + 1), tl.load(h + H.lr),"),
              ("kernels/lars.py", "r = trust_ratio_reference(w_norm, d_norm, h.eta,", "r = trust_ratio_reference(w_norm, d_norm, h.lr,")],
             ["tests/test_trust_ratio_kernels.py::test_two_steps_match_equations_written_here"],
             "kfopt.kernels.lars"),
    Mutation("sonew-record-bias-corrections-swapped",
             [("kernels/sonew.py", 'ln_beta1=log_decay("beta1", self.beta1), ln_beta2=log_decay("beta2", self.beta2))',
               'ln_beta1=log_decay("beta2", self.beta2), ln_beta2=log_decay("beta1", self.beta1))')],
             ["tests/test_sonew_kernels.py::test_step_matches_the_equations_written_here"],
             "kfopt.kernels.sonew"),
    Mutation("sonew-kernel-ignores-halo-gradient",
             [("kernels/sonew.py", "+ tl.load(halo, mask=(~local) & inside, other=0.0)) * coef", ") * coef")],
             ["tests/test_sonew_kernels.py::test_shards_with_their_halos_equal_the_whole_tensor[1-dtype0]"],
             "kfopt.kernels.sonew"),
    Mutation("graft-record-momentum-for-wd",
             [("kernels/graft.py", "return dict(ln_beta1=ln_beta1, ln_beta2=ln_beta2)",
               "return dict(weight_decay=self.momentum, ln_beta1=ln_beta1, ln_beta2=ln_beta2)")],
             ["tests/test_graft_kernels.py::test_two_steps_match_the_equations_written_here"],
             "kfopt.kernels.graft"),
    Mutation("singd-blown-up-factors-committed",
             [("kfopt/singd.py", "                for targets, new in pending:\n                    _commit(verdict, targets, new)",
               "                for targets, new in pending:\n                    _commit(torch.ones_like(verdict), targets, new)"),
              ("kfopt/singd.py", "        for targets, new in self._pending:\n            _commit(ok, targets, new)",
               "        for targets, new in self._pending:\n            _commit(torch.ones_like(ok), targets, new)")],
             ["tests/test_singd.py::test_a_blown_up_factor_update_keeps_the_last_finite_factors"],
             "kfopt.singd"),
    Mutation("kfac-graft-skip-keeps-new-factors",
             [("kfopt/kfac.py", "            factor.copy_(torch.where(ok, factor, old))", "            pass")],
             ["tests/contracts/test_resume.py::test_a_blown_up_step_is_skipped_counted_warned_once_and_checkpointed"
              "[kfac-graft]"],
             "kfopt.kfac"),
    Mutation("graft-adam-preconditions-the-raw-gradient",
             [("kfopt/composed.py", 'if self.defaults["graft"] == "adam" and moments:',
               'if self.defaults["graft"] == "none" and moments:')],
             ["tests/test_graft.py::test_adam_grafting_preconditions_the_first_moment[kfac-adam]"],
             "kfopt.composed"),
    Mutation("covariance-kernel-and-reference-divide-by-rows-plus-1",
             [("kernels/covariance.py", "    new = acc / rows\n", "    new = acc / (rows + 1)\n"),
              ("kernels/covariance.py", "new = a.T @ a / a.shape[0]", "new = a.T @ a / (a.shape[0] + 1)")],
             ["tests/test_covariance.py::test_matches_the_equations_written_here"], "kfopt.kernels.covariance"),
    Mutation("eigen-kernel-and-reference-damp-each-factor",
             [("kernels/eigen_basis.py", "acc = acc / (dg[:, None] * da[None, :] + tl.load(damping_ptr + g))",
               "acc = acc / ((dg[:, None] + tl.load(damping_ptr + g)) * (da[None, :] + tl.load(damping_ptr + g)))"),
              ("kernels/eigen_basis.py", "v2 = v1 / (torch.outer(d_g.to(dtype), d_a.to(dtype)) + lam)",
               "v2 = v1 / torch.outer(d_g.to(dtype) + lam, d_a.to(dtype) + lam)")],
             ["tests/test_eigen_basis.py::test_matches_the_equation_written_here"], "kfopt.kernels.eigen_basis"),
    Mutation("lars-optimizer-ignores-nesterov",
             [("kfopt/lars.py", 'nesterov=group["nesterov"]', "nesterov=False")],
             ["tests/test_optimizers.py::test_lars_nesterov_follows_the_equations"], "kfopt.lars"),
    Mutation("kfac-kl-clip-not-clamped",
             [("kfopt/kfac.py", "(self.kl_clip / vg.abs()).sqrt().clamp(max=1.0)", "(self.kl_clip / vg.abs()).sqrt()")],
             ["tests/test_kfac.py::test_kl_clip_scales_by_at_most_one"], "kfopt.kfac"),
    Mutation("row-shards-gather-sources-reversed",
             [("kfopt/row_shards.py", "        for source in range(plan.ranks):  # the receive buffer is source-major",
               "        for source in reversed(range(plan.ranks)):  # the receive buffer is source-major")],
             ["tests/test_row_shards.py::test_gather_owner_scatter_is_bitwise_the_function_of_the_full_matrix"],
             "kfopt.row_shards"),
    Mutation("row-shards-volume-without-fsdp2-padding",
             [("kfopt/row_shards.py", "padded_rows = sum(-(-rows // self.ranks)",
               "padded_rows = sum((rows // self.ranks)")],
             ["tests/test_row_shards.py", "-k", "volume_by_hand or reduce_scatter_volume"],
             "kfopt.row_shards"),
    Mutation("sharded-finite-verdict-not-agreed",
             [("kfopt/sharded_distribution.py", "        dist.all_reduce(flag, op=dist.ReduceOp.MIN)\n", "")],
             ["tests/test_kronecker_sharded.py::test_sharded_singd_equals_one_process[w2-2-singd-block]"],
             "kfopt.sharded_distribution"),
    Mutation("mkor-sharded-finite-verdict-per-rank",
             [("kfopt/mkor.py", "finite = self._shards.all_true(finite)", "finite = finite")],
             ["tests/test_kronecker_sharded.py::test_sharded_mkor_skips_a_nan_in_one_shard_on_every_rank"],
             "kfopt.mkor"),
    Mutation("singd-base-ignores-the-verdict",
             [("kfopt/singd.py", "self.base.step(verdict=verdict, directions=",
               "self.base.step(verdict=torch.ones_like(verdict), directions=")],
             ["tests/test_singd.py::test_non_finite_statistics_skip_the_step"], "kfopt.singd"),
    Mutation("composed-host-verdict-ignored",
             [("kfopt/composed.py", "        elif verdict.item():\n", "        elif True:\n")],
             ["tests/test_singd.py::test_a_base_without_a_device_verdict_is_not_stepped_on_a_skipped_step"],
             "kfopt.composed"),
    Mutation("graft-kernel-norms-not-reduced-over-shards",
             [("kernels/graft.py", "norms = launch_segment_norms(table, partial, ok, step_col=None, reduce=reduce)",
               "norms = launch_segment_norms(table, partial, ok, step_col=None)")],
             ["tests/test_graft_kernels.py::test_shards_equal_the_whole_tensor"], "kfopt.kernels.graft"),
    Mutation("sharded-graft-norms-per-shard",
             [("kfopt/composed.py", "found_inf=None if verdict is None else ~verdict, reduce=reduce) != 0",
               "found_inf=None if verdict is None else ~verdict, reduce=None) != 0")],
             ["tests/test_kronecker_sharded.py::test_sharded_grafting_equals_one_process[w4-kfac-adam]"],
             "kfopt.composed"),
    Mutation("sharded-graft-finite-inputs-per-rank",
             [("kfopt/composed.py", "        return self.preconditioner.distributor.all_finite(self._finite_inputs(",
               "        return (lambda finite: finite)(self._finite_inputs(")],
             ["tests/test_kronecker_sharded.py::test_sharded_grafting_equals_one_process[w2-kfac-adam]"],
             "kfopt.composed"),
    Mutation("kfac-second-order-received-in-place",
             [("kfopt/kfac.py", "                layer.second = [torch.empty_like(t) for t in layer.second]",
               "                pass")],
             ["tests/test_kfac_distributed.py::test_a_grafted_step_that_blows_up_is_skipped_alike_on_every_rank"],
             "kfopt.kfac"),
    Mutation("heavy-ball-verdict-per-rank",
             [("kfopt/heavy_ball.py", "verdict = self._layout.all_true(self._finite_inputs(",
               "verdict = (lambda finite: finite)(self._finite_inputs(")],
             ["tests/test_sharded_elementwise.py::test_nan_in_one_shard_skips_on_every_rank[torch-HeavyBall]"],
             "kfopt.heavy_ball"),
    Mutation("perf-lamb-kernel-decays-m-by-b2",
             [("kernels/lamb.py", "m = b1 * tl.load(m_ptr + offs", "m = b2 * tl.load(m_ptr + offs")],
             ["perf/test_elementwise.py", "-k", "lamb-kfopt"], "kfopt.kernels.lamb"),
    Mutation("perf-lars-kernel-halves-momentum-decay",
             [("kernels/lars.py", "m = mu * tl.load(m_ptr + offs", "m = 0.5 * mu * tl.load(m_ptr + offs")],
             ["perf/test_elementwise.py", "-k", "lars-kfopt"], "kfopt.kernels.lars"),
]


def make_copy(dest: Path) -> None:
    shutil.copytree(ROOT, dest, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "build"))
    for pkg in ("kernels", "autotune"):
        link = dest / "kfopt" / pkg
        if not link.exists():
            link.symlink_to(Path("..") / pkg)


def run_mutation(m: Mutation, timeout: float) -> tuple[bool, str]:
    """(caught, summary line of pytest)."""
    with tempfile.TemporaryDirectory(prefix="kfopt-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        make_copy(copy)
        for file, old, new in m.edits:
            path = copy / file
            text = path.read_text()
            if text.count(old) != 1:
                raise SystemExit(f"{m.name}: {old!r} occurs {text.count(old)} times in {file} (update the mutation)")
            path.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
        where = subprocess.run([sys.executable, "-c", f"import {m.module} as x; print(x.__file__)"], cwd=copy,
                               env=env, capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"{m.name}: {m.module} is not imported from the copy: {where.stdout}{where.stderr}")
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *m.tests],
                                cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        return result.returncode == 1, lines[-1] if lines else result.stderr[-300:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {' '.join(m.tests)}")
        return 0
    survived = 0
    for m in chosen:
        caught, summary = run_mutation(m, args.timeout)
        survived += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} {m.name}: {' '.join(m.tests)} -> {summary}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
